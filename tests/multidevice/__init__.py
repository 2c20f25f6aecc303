"""Checks that need several devices, run in their own processes.

Each module here is a script of named checks (``python -m
tests.multidevice.<module> [check ...]``) that expects 8 forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before JAX is
imported). ``tests/test_scale_out.py`` starts them with that environment and
asserts their exit status; the main test process, whose JAX already runs on
one device, only imports these modules (for their doctests).
"""
