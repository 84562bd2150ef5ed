"""Config keys a resume must keep (config.RESUME_FIXED_KEYS, resume_differences): light, no training."""

from __future__ import annotations

import copy

from inflora_dist.config import RunConfig, resume_differences, to_dict


def _pair() -> tuple[dict, dict]:
    saved = to_dict(RunConfig(output_dir="runs/imr/seed0", seed=0))
    return saved, copy.deepcopy(saved)


def test_a_resume_with_another_seed_is_listed():
    saved, current = _pair()
    current["seed"] = 1
    assert resume_differences(saved, current) == ["seed: 0 -> 1"]


def test_image_recipes_are_fixed_but_later_tasks_settings_are_not():
    saved, current = _pair()
    current["data"]["train_transform"] = "imagenet_r_train"
    current["data"]["eval_transform"] = "imagenet_r_eval"
    # Meant to change on resume: settings of later tasks, logging, cadence, evaluation, DeepSpeed, the passes.
    current["train"].update(lr=1e-3, epochs=7, global_batch_size=64, eval_batch_size=8, log_every=1)
    current["inflora"]["covariance_max_tokens"] = 1000
    current["checkpoint"]["every_steps"] = 5
    current["deepspeed"]["zero_stage"] = 3
    current["wandb"]["enabled"] = True
    current.update(output_dir="elsewhere", resume="never")
    assert resume_differences(saved, current) == [
        "data.eval_transform: None -> 'imagenet_r_eval'",
        "data.train_transform: None -> 'imagenet_r_train'",
    ]


def test_every_changed_fixed_key_is_named_sorted():
    saved, current = _pair()
    current.update(seed=3, method="seq_lora")
    current["inflora"]["rank"] = 4
    current["model"]["max_new_tokens"] = 99  # generation only: free
    assert resume_differences(saved, current) == [
        "inflora.rank: 10 -> 4",
        "method: 'inflora' -> 'seq_lora'",
        "seed: 0 -> 3",
    ]


def test_keys_added_since_a_checkpoint_was_written_are_no_change():
    """A checkpoint written before `model.chat_template` and the image recipes existed resumes: a key its saved
    config lacks counts at its default (before, `model.chat_template: None -> 'auto'` refused the resume)."""
    from inflora_dist.run_record import config_changes

    saved = to_dict(RunConfig())
    del saved["model"]["chat_template"], saved["data"]["train_transform"], saved["data"]["eval_transform"]
    assert resume_differences(saved, to_dict(RunConfig())) == []
    assert config_changes(saved, to_dict(RunConfig())) == []
