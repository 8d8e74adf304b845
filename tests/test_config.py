import json

import pytest

from gata_ft.config import TrainConfig, build_config
from gata_ft.errors import ConfigError
from gata_ft.sagemaker import job_paths, num_gpus, read_hyperparameters

# What the platform's launch workflow sends today, as SageMaker writes it: strings.
WORKFLOW = {
    "per_device_train_batch_size": "16",
    "num_train_epochs": "4",
    "learning_rate": "0.00002",
    "weight_decay": "0.01",
    "warmup_ratio": "0.1",
    "gradient_accumulation_steps": "4",
    "gradient_checkpointing": "true",
}


def test_workflow_hyperparameters_are_all_honoured():
    config, user_set, warnings = build_config(WORKFLOW, {})
    assert config.per_device_train_batch_size == 16
    assert config.num_train_epochs == 4.0
    assert config.learning_rate == 0.00002
    assert config.weight_decay == 0.01
    assert config.warmup_ratio == 0.1
    assert config.gradient_accumulation_steps == 4
    assert config.gradient_checkpointing is True
    assert user_set == sorted(WORKFLOW)
    assert warnings == []


def test_values_json_encoded_by_the_sagemaker_sdk_are_unwrapped():
    config, _, _ = build_config(
        {"base_model": '"bert-base-uncased"', "seed": '"7"', "fp16": '"false"'}, {}
    )
    assert (config.base_model, config.seed, config.fp16) == ("bert-base-uncased", 7, False)


def test_native_json_values_are_accepted():
    config, _, _ = build_config({"seed": 3, "learning_rate": 1e-4, "bf16": True}, {})
    assert (config.seed, config.learning_rate, config.bf16) == (3, 1e-4, True)


@pytest.mark.parametrize(
    ("raw", "value"), [("TRUE", True), ("1", True), ("yes", True), ("off", False)]
)
def test_booleans(raw, value):
    assert build_config({"normalize_text": raw}, {})[0].normalize_text is value


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        (
            "per_device_train_batch_size",
            "16.0",
            "per_device_train_batch_size: expected an integer, found '16.0' (in hp.json)",
        ),
        ("learning_rate", "fast", "learning_rate: expected a number, found 'fast' (in hp.json)"),
        ("learning_rate", "nan", "learning_rate: expected a number, found 'nan' (in hp.json)"),
        (
            "gradient_checkpointing",
            "maybe",
            "gradient_checkpointing: expected true or false, found 'maybe' (in hp.json)",
        ),
        ("seed", True, "seed: expected an integer, found True (in hp.json)"),
        ("learning_rate", "-0.1", "learning_rate: expected a number between 0 and 1, found -0.1"),
        (
            "per_device_train_batch_size",
            "0",
            "per_device_train_batch_size: expected at least 1, found 0",
        ),
        ("warmup_ratio", "1.5", "warmup_ratio: expected a number from 0 up to 1, found 1.5"),
        ("max_length", "4", "max_length: expected an integer from 8 to 8192, found 4"),
        (
            "metric_for_best_model",
            "auc",
            "metric_for_best_model: expected one of ('f1', 'accuracy', 'precision', 'recall', "
            "'f1_macro', 'precision_macro', 'recall_macro', 'loss'), found 'auc'",
        ),
    ],
)
def test_bad_values_are_clear_errors(key, raw, message):
    with pytest.raises(ConfigError) as info:
        build_config({key: raw}, {}, "hp.json")
    assert str(info.value) == message


def test_fp16_and_bf16_together_is_an_error():
    with pytest.raises(ConfigError) as info:
        build_config({"fp16": "true", "bf16": "true"}, {})
    assert str(info.value) == "fp16 and bf16 are both true: choose one mixed precision"


def test_unknown_keys_warn_with_a_suggestion_and_sagemaker_keys_are_quiet():
    _, user_set, warnings = build_config(
        {"learning_rat": "0.1", "colour": "red", "sagemaker_program": "x", "seed": "1"},
        {},
        "hp.json",
    )
    assert warnings == [
        "unknown hyperparameter 'learning_rat' in hp.json is ignored "
        "(did you mean 'learning_rate'?)",
        "unknown hyperparameter 'colour' in hp.json is ignored",
    ]
    assert user_set == ["seed"]


def test_flags_override_hyperparameters_and_defaults_stay_unset():
    config, user_set, _ = build_config(
        {"seed": "1", "learning_rate": "0.1"}, {"seed": "9", "fp16": None}
    )
    assert config.seed == 9
    assert config.learning_rate == 0.1
    assert config.fp16 is None
    assert user_set == ["learning_rate", "seed"]


def test_an_image_can_set_the_default_base_model_and_users_still_win():
    env = {"GATA_BASE_MODEL": "/opt/gata/base-model"}
    config, user_set, _ = build_config({}, {}, env=env)
    assert config.base_model == "/opt/gata/base-model"
    assert user_set == []
    config, user_set, _ = build_config({"base_model": "bert-large-uncased"}, {}, env=env)
    assert config.base_model == "bert-large-uncased"


def test_defaults():
    config = TrainConfig()
    assert config.base_model == "bert-base-uncased"
    assert config.metric_for_best_model == "f1"
    assert config.allow_download is False


def test_job_paths_default_to_opt_ml():
    paths = job_paths({})
    assert str(paths.train) == "/opt/ml/input/data/train"
    assert str(paths.test) == "/opt/ml/input/data/test"
    assert str(paths.artifact) == "/opt/ml/model/model.tar.gz"
    assert str(paths.output_data_dir) == "/opt/ml/output/data"
    assert str(paths.checkpoint_dir) == "/opt/ml/checkpoints"
    assert str(paths.failure_file) == "/opt/ml/output/failure"
    assert str(paths.hyperparameters_file) == "/opt/ml/input/config/hyperparameters.json"


def test_job_paths_follow_the_environment_and_overrides(tmp_path):
    env = {"SM_CHANNEL_TRAIN": "/data/tr", "SM_OUTPUT_DIR": "/out", "GATA_CHECKPOINT_DIR": "/ck"}
    paths = job_paths(env, test=tmp_path, train=None)
    assert str(paths.train) == "/data/tr"
    assert paths.test == tmp_path
    assert str(paths.failure_file) == "/out/failure"
    assert str(paths.checkpoint_dir) == "/ck"


def test_read_hyperparameters(tmp_path):
    assert read_hyperparameters(tmp_path / "absent.json") == {}
    good = tmp_path / "hp.json"
    good.write_text(json.dumps(WORKFLOW))
    assert read_hyperparameters(good) == WORKFLOW
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"expected a JSON object of hyperparameters, found list"):
        read_hyperparameters(bad)
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match=r"found invalid JSON"):
        read_hyperparameters(bad)


def test_num_gpus():
    assert num_gpus({}) is None
    assert num_gpus({"SM_NUM_GPUS": "4"}) == 4
    with pytest.raises(
        ConfigError, match=r"^SM_NUM_GPUS: expected a non-negative integer, found 'x'$"
    ):
        num_gpus({"SM_NUM_GPUS": "x"})


@pytest.mark.parametrize(
    ("flags", "cuda", "precision"),
    [
        ({}, True, "fp16"),
        ({}, False, "fp32"),
        ({"bf16": "true"}, True, "bf16"),
        ({"bf16": "true"}, False, "bf16"),
        ({"fp16": "false"}, True, "fp32"),
    ],
)
def test_precision_is_fp16_on_cuda_unless_chosen_otherwise(flags, cuda, precision):
    assert build_config(flags, {})[0].precision(cuda) == precision


def test_fp16_on_a_cpu_is_an_error():
    from gata_ft.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config({"fp16": "true"}, {})[0].precision(cuda=False)
    assert str(info.value) == (
        "fp16: expected a CUDA GPU for fp16 mixed precision, found none; "
        "leave fp16 unset (automatic) or use bf16"
    )
