"""Shim for editable installs with the setuptools that Python 3.6 has; metadata lives in setup.cfg."""
from setuptools import setup

setup()
