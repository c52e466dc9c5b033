"""The README documents every setting an operator can set."""

from medserve.settings import Settings


def test_every_setting_is_in_the_readme(repo_root):
    readme = (repo_root / "README.md").read_text()
    missing = [f"MEDSERVE_{name.upper()}" for name in Settings.model_fields if f"`MEDSERVE_{name.upper()}`" not in readme]
    assert missing == []
