import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from leukodet.registry import DATASETS, Registry, RegistryError, load_plugins


def test_register_by_decorator_and_call_with_aliases():
    reg = Registry("widget")

    @reg.register(aliases=["bf"])
    def bilateral_filter(size=3):
        return ("bilateral", size)

    reg.register(lambda: "x", name="plain")
    assert reg.get("bilateral_filter") is bilateral_filter
    assert reg.get("bf") is bilateral_filter
    assert "bf" in reg and "nothing" not in reg
    assert reg.names() == ["bilateral_filter", "plain"]
    assert reg.build({"name": "bf", "size": 9}) == ("bilateral", 9)
    assert reg.build("plain") == "x"


def test_same_object_twice_is_fine_but_a_clash_fails():
    reg = Registry("widget")

    def step():
        pass

    reg.register(step)
    reg.register(step)  # a re-import registers again
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(lambda: None, name="step")


def test_unknown_name_lists_known_names_and_suggests_close_match():
    reg = Registry("preprocessing step")
    for name in ("bilateral", "equalize", "green_threshold"):
        reg.register(lambda: None, name=name)
    with pytest.raises(RegistryError) as err:
        reg.get("bilaterl")
    message = str(err.value)
    assert "Did you mean 'bilateral'" in message
    assert "bilateral, equalize, green_threshold" in message


def test_build_from_omegaconf_node_and_bad_params():
    reg = Registry("thing")
    reg.register(lambda a, b=2: a * b, name="mul")
    assert reg.build(OmegaConf.create({"name": "mul", "a": 3})) == 6
    assert reg.build({"name": "mul", "a": 3}, b=5) == 15
    with pytest.raises(RegistryError, match="no 'name' key"):
        reg.build({"a": 1})
    with pytest.raises(TypeError, match="cannot build thing 'mul'"):
        reg.build({"name": "mul", "a": 1, "c": 2})


def test_plugin_from_installed_dist_is_used_by_name(tmp_path, monkeypatch):
    """A tiny installed distribution (dist-info with an entry point) registers a dataset reader."""
    (tmp_path / "leukodet_toy_plugin.py").write_text(textwrap.dedent("""
        from leukodet.data.records import ImageRecord
        from leukodet.data.via import ParseResult
        from leukodet.registry import DATASETS

        @DATASETS.register(name="toy_reader")
        def toy_reader(path, labels=None):
            return ParseResult([ImageRecord(path, [], 10, 10, source="toy")], [])
    """))
    dist = tmp_path / "leukodet_toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: leukodet-toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[leukodet.plugins]\ntoy = leukodet_toy_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "leukodet_toy_plugin", raising=False)

    assert "toy_reader" not in DATASETS
    assert load_plugins() == ["toy"]
    source = OmegaConf.create({"name": "toy_reader", "path": "some/file.json"})
    result = DATASETS.build(source, labels=None)
    assert result.records[0].file_name == "some/file.json"


def test_broken_plugin_names_itself(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[leukodet.plugins]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="plugin 'broken'"):
        load_plugins()

