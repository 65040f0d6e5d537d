"""Acting: planning leaf coalesces and running them safely through the storage manager."""
