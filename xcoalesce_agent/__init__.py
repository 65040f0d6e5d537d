"""xcoalesce-agent: reclaims the space that VM snapshots leave behind on XenServer / XCP-ng hosts."""

__version__ = "0.1.0"
