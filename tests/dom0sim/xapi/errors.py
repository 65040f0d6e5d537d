"""The one exception the simulated xapi raises: an ErrorDescription list, as on the wire."""


class XapiError(Exception):
    """A xapi failure: `details` is [CODE, param, ...], every element a string."""

    def __init__(self, code, *params):
        self.details = [code] + [str(param) for param in params]
        Exception.__init__(self, self.details)
