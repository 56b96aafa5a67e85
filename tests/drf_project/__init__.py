"""A tiny DRF API for tests/test_drf.py: each way a DRF view can be limited."""
