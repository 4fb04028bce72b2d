"""Values taken as something else, and counts beyond what they count: a boolean where a number is
meant, a YAML merge key, a file that is not UTF-8, a registry name MLflow refuses, more
checkpoints than steps; the launcher and the machine's memory, checked by the validate stage."""
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.train import preflight
from pipeline.core.config import ConfigError, load_params, parse_params
from stages import validate

ROOT = Path(__file__).resolve().parents[1]


def _params_with(tmp_path, old: str, new: str) -> Path:
    """params.yaml with one line's text replaced, as `dvc exp run -S` or a user's edit leaves it."""
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, message", [
    ("  shards: 4", "  shards: true", "iet.shards: must be a number, not a boolean"),  # dvc exp run -S iet.shards=true
    ("  lr: 1.0e-3", "  lr: yes", "train.lr: must be a number, not a boolean"),
    ("  tau: 0.5", "  tau: on", "agc.tau: must be a number, not a boolean"),
])
def test_a_boolean_where_a_number_is_expected_is_refused_naming_key_and_value(tmp_path, old, new, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_params(_params_with(tmp_path, old, new))
    assert str(err.value).endswith("(got True)") and "\n" not in str(err.value)


def test_a_boolean_inside_a_list_of_numbers_or_a_numeric_choice_is_refused_and_real_booleans_pass():
    for group, key, value in [("model", "block_out_channels", [True, 8]), ("data", "channels", True),
                              ("model", "attention_head_dim", False)]:
        with pytest.raises(ConfigError, match=re.escape(f"{group}.{key}: must be a number, not a boolean")):
            parse_params({group: {key: value}})
    # keys that are booleans, or take one among strings, still do
    p = parse_params({"agc": {"enabled": False}, "eval": {"inception": True}, "train": {"stack_proxies": False}})
    assert (p.agc.enabled, p.eval.inception, p.train.stack_proxies) == (False, True, "false")


def test_yaml_merge_keys_work_and_a_key_twice_in_one_mapping_is_still_refused(tmp_path):
    block = "seeds:\n  data: 0\n  split: 0\n  train: 0\n  eval: 0\n"
    text = yaml.safe_dump(yaml.safe_load((ROOT / "params.yaml").read_text()), sort_keys=False)
    assert block in text
    merged = "seeds:\n  <<: &zero {data: 0, split: 0, train: 7}\n  train: 0\n  eval: 0\n"
    (tmp_path / "p.yaml").write_text(text.replace(block, merged))
    assert load_params(tmp_path / "p.yaml").seeds.train == 0  # the mapping's own key wins over the merged one
    (tmp_path / "d.yaml").write_text(text.replace(block, merged + "  eval: 1\n"))
    with pytest.raises(ConfigError, match="key 'eval' appears twice"):
        load_params(tmp_path / "d.yaml")


def test_a_file_that_is_not_utf8_is_one_line_naming_the_file_and_the_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not UTF-8 text (byte 0xe9 at offset ")):
        load_params(path)
    result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(path), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 1 and "not UTF-8 text" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "agc:\n  1: 2\n"])
def test_a_list_or_a_number_as_a_key_is_one_line(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping of parameter groups, with names as keys"):
        load_params(tmp_path / "p.yaml")


def test_the_registry_name_follows_mlflows_own_rule():
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    for name in ["..", ".", "..x", "a/..", "a.b", "a..b", "iet-agc", "x" * 256]:
        try:
            _validate_model_name(name)
            mlflow_accepts = True
        except MlflowException:
            mlflow_accepts = False
        try:
            parse_params({"tracking": {"registry_name": name}})
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == mlflow_accepts, name


@pytest.mark.parametrize("groups, message", [
    ({"iet": {"checkpoints_per_round": 100_000_000}},
     "iet.checkpoints_per_round (100000000) must not exceed the optimizer steps of the whole run (576"),
    ({"pretrain": {"rounds": 5, "steps": 2}}, "pretrain.rounds (5) must not exceed pretrain.steps (2)"),
])
def test_counts_are_bounded_by_what_they_count(groups, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(groups)


def test_more_checkpoints_than_a_proxys_steps_are_still_accepted_up_to_the_runs_steps():
    p = parse_params({})
    most = p.iet.rounds * p.iet.shards * p.iet_steps_per_round()
    assert parse_params({"iet": {"checkpoints_per_round": most}})
    with pytest.raises(ConfigError, match="iet.checkpoints_per_round"):
        parse_params({"iet": {"checkpoints_per_round": most + 1}})
    # one step a round, two checkpoints: a tiny run the tests train
    assert parse_params({"data": {"train_size": 2, "heldout_size": 2, "duplicates": {"images": 0}},
                         "iet": {"shards": 1}}).iet_steps_per_round() == 1


@pytest.mark.parametrize("launcher", ["pyton", "no-such-accelerate launch", "'"])
def test_a_launcher_that_is_not_a_command_here_is_refused_by_validate(tmp_path, launcher):
    path = _params_with(tmp_path, "  launcher: python", f"  launcher: {yaml.safe_dump(launcher).splitlines()[0]}")
    result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(path), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 1 and "train.launcher: " in result.output, result.output
    assert not (tmp_path / "ok").exists()


def test_the_default_launcher_and_memory_pass():
    preflight.check_machine(load_params(ROOT / "params.yaml"))


@pytest.mark.parametrize("groups, key", [
    ({"model": {"block_out_channels": [8, 200000]}}, "model.block_out_channels"),
    ({"data": {"duplicates": {"copies": 1_000_000_000}}}, "data.duplicates.copies"),
    ({"data": {"source": "folder", "path": "x", "train_size": 10**10}}, "data.train_size"),
])
def test_a_run_beyond_the_machines_memory_is_refused_naming_the_key(groups, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: the run needs at least ")) as err:
        preflight.check_memory(parse_params(groups))
    assert "more than this machine's" in str(err.value)


def test_the_memory_bound_grows_with_the_widths_and_the_data():
    base = preflight.memory_needs(parse_params({}))
    wide = preflight.memory_needs(parse_params({"model": {"block_out_channels": [64, 128, 128]}}))
    assert wide["model.block_out_channels"] > 3 * base["model.block_out_channels"]
    assert preflight.unet_parameters(parse_params({})) == _built_parameters()


def _built_parameters() -> int:
    from pipeline.core.models import build_unet

    p = parse_params({})
    return sum(t.numel() for t in build_unet(p.model, p.data.resolution, p.data.channels, seed=0).parameters())


def test_checkpoints_that_fit_the_steps_but_not_the_memory_are_refused_naming_the_key():
    p = parse_params({"model": {"block_out_channels": [64, 128, 128]}, "data": {"train_size": 5000 - 256},
                      "iet": {"checkpoints_per_round": 1800}})
    with pytest.raises(ConfigError, match=re.escape("iet.checkpoints_per_round: the run needs at least ")):
        preflight.check_memory(p, total=16 * 2**30)


def test_on_a_gpu_the_models_part_is_checked_against_the_gpus_memory_and_the_rest_against_the_machines():
    import torch

    p = parse_params({"model": {"block_out_channels": [64, 128, 128]}})
    needs, gpu = preflight.memory_needs(p), torch.device("cuda:0")
    with pytest.raises(ConfigError, match=re.escape("model.block_out_channels: the run needs at least ")) as err:
        preflight.check_memory(p, device=gpu, device_total=int(needs["model.block_out_channels"] / 2))
    assert "more than GPU cuda:0's" in str(err.value)
    preflight.check_memory(p, device=gpu, device_total=int(needs["model.block_out_channels"] * 2),
                           total=int(sum(needs.values()) - needs["model.block_out_channels"]) + 1)  # fits both
    with pytest.raises(ConfigError, match="more than this machine's"):  # the host part alone is too much
        preflight.check_memory(p, device=gpu, device_total=2**40, total=int(needs["data.train_size"] / 2))
