"""The six programs; each is a short main() over plugins."""
