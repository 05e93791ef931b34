"""Fixtures shared by every test folder: an embedded S3 server, generated tiny models."""
