"""The sample data works end to end."""

from conftest import SAMPLES


def test_inspect_sample_is_clean(cli):
    result = cli("inspect", SAMPLES / "model.pt")
    assert result.exit_code == 0, result
    assert "features.1" in result.stdout
    assert "0 errors" in result.stdout
