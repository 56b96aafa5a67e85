"""A tiny Django Ninja API for tests/test_ninja.py."""
