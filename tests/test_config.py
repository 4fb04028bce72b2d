import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params


def test_the_committed_params_file_is_valid():
    p = load_params("params.yaml")
    assert 0 < p.agc.tau <= 1 and p.iet.shards <= p.data.train_size


@pytest.mark.parametrize("override, key", [
    ({"agc": {"tau": 1.5}}, "agc.tau"),
    ({"agc": {"tau": 0}}, "agc.tau"),
    ({"agc": {"tua": 0.5}}, "agc.tua"),
    ({"iet": {"shards": "four"}}, "iet.shards"),
    ({"data": {"source": "cifar"}}, "data.source"),
    ({"data": {"train_size": 8}, "iet": {"shards": 16}}, "iet.shards"),
    ({"data": {"resolution": 18}}, "data.resolution"),
    ({"data": {"source": "folder"}}, "data.path"),
    ({"modle": {}}, "modle"),
])
def test_bad_parameters_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        parse_params(override)
    assert key in str(err.value)


def test_error_lists_allowed_values(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"data": {"source": "cifar"}}))
    with pytest.raises(ConfigError, match="mnist5k"):
        load_params(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(bad)
