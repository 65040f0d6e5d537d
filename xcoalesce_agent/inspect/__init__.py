"""Seeing the host: xapi's records, the host tools, the image forests, the estimates and the reports."""
