"""A tiny Django project for tests/test_django.py: views for each way of choosing a limit."""
