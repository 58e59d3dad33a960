"""Tests of `cai serve`. A package, so that its conftest does not shadow tests/conftest.py for modules
that `from conftest import ...` (non-package conftests all share the module name `conftest`)."""
