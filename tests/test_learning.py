"""The learning check on real CIFAR-10 images (see tests/learning.py): a short CPU run must beat the
same network with its weights left at initialisation by a clear kNN margin."""
import pytest

from learning import CONFIGS, TARBALL, check, extract_subset

pytestmark = pytest.mark.skipif(not TARBALL.exists(), reason=f"real CIFAR-10 JPEGs not found at {TARBALL}")


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    return extract_subset(tmp_path_factory.mktemp("cifar10-subset"))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_short_run_learns(method, cifar_subset, tmp_path):
    control, trained, gain = check(method, cifar_subset, tmp_path)
    print(f"{method}: kNN top-1 {control:.1f}% at init, {trained:.1f}% trained")
    assert trained - control >= gain, (control, trained)
