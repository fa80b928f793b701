"""Shared test setup. Fixtures live in tests/fixtures/, one module per concern."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.postgres",
    "tests.fixtures.emulator",
    "tests.fixtures.proxy",
    "tests.fixtures.upstream_hosts",
    "tests.fixtures.browser",
]
