"""Session-wide test settings."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def fidelity_cache(tmp_path_factory):
    """Reference features are cached under GENSPEC_CACHE (genspec/measure/fidelity.py): the tests, and
    the CLI runs they start, keep theirs in a folder of the session, not in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("genspec_cache")
        patch.setenv("GENSPEC_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def plugin_registrations():
    """What a test's plugins register (a spec's `plugins:`, a hook) is undone after it, so that no
    plugin's names leak into the next test's vocabulary."""
    from genspec.plugins import isolated

    with isolated():
        yield


# Property tests draw the same examples on every run (the suite is deterministic), and keep no
# example database in the checkout.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("genspec", derandomize=True, database=None)
_hypothesis_settings.load_profile("genspec")
