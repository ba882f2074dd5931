"""benchmarks/vs_trl.py plumbing that needs no TRL: the synthetic data, the run order, the summary,
and gpu.sh's plan. No timings are asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.paths import REPO, import_file

@pytest.fixture(scope="module")
def vs_trl():
    yield import_file(REPO / "benchmarks/vs_trl.py", "vs_trl_under_test")
    del sys.modules["vs_trl_under_test"]


def test_synthetic_rows_vary_within_bounds_and_tokenize_one_token_per_word(vs_trl):
    work = vs_trl.Workload(prompt_lens=(3, 9), completion_lens=(2, 5), prompt_len=12, seed=1)
    rows = vs_trl.synthetic_rows("preference", 200, 50, work)
    assert rows == vs_trl.synthetic_rows("preference", 200, 50, work)  # same seed, same data for both frameworks
    prompt_lens = {len(r["prompt"].split()) for r in rows}
    chosen_lens = {len(r["chosen"].split()) for r in rows}
    assert prompt_lens == set(range(3, 10)) and chosen_lens == set(range(2, 6))  # every length drawn, none outside
    prompts = vs_trl.synthetic_rows("prompt", 100, 50, work)
    assert {len(r["prompt"].split()) for r in prompts} == set(range(6, 12))  # half of prompt_len up to prompt_len - 1
    tokenizer = vs_trl.build_tokenizer(50)
    ids = tokenizer(rows[0]["prompt"])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(rows[0]["prompt"].split()) + 1
    assert tokenizer.pad_token_id == vs_trl.PAD_ID and tokenizer.eos_token_id == vs_trl.EOS_ID
    assert all(3 < i < 50 for i in ids[1:])  # words never collide with pad/unk/bos/eos
    with pytest.raises(ValueError, match="unknown row kind"):
        vs_trl.synthetic_rows("pairs", 1, 50, work)


def test_runs_interleave_lit_and_trl_round_by_round(vs_trl):
    plan = vs_trl.schedule(["dpo_lora", "grpo"], repeats=2)
    assert plan == [("dpo_lora", 0, "lit"), ("dpo_lora", 0, "trl"), ("grpo", 0, "lit"), ("grpo", 0, "trl"),
                    ("dpo_lora", 1, "lit"), ("dpo_lora", 1, "trl"), ("grpo", 1, "lit"), ("grpo", 1, "trl")]


def test_warmup_runs_come_first_and_are_left_out_of_the_summary(vs_trl):
    plan = vs_trl.schedule(["dpo_full", "dpo_lora"], repeats=1, warmup_runs=1)
    assert plan[:2] == [("dpo_full", -1, "lit"), ("dpo_full", -1, "trl")]
    assert [r for _, r, _ in plan[2:]] == [0, 0, 0, 0]
    runs = [{"workload": "dpo_full", "framework": "lit", "step_s": 3.0, "warmup_run": True},
            {"workload": "dpo_full", "framework": "lit", "step_s": 1.0},
            {"workload": "dpo_full", "framework": "trl", "step_s": 2.0},
            {"workload": "dpo_full", "framework": "trl", "error": "timed out"}]
    (row,) = vs_trl.summarize(vs_trl.timed(runs))
    assert (row["lit"], row["trl"], row["lit_advantage"]) == (1.0, 2.0, 2.0)


def test_summary_takes_medians_and_orients_the_advantage(vs_trl):
    runs = [
        {"workload": "dpo_lora", "framework": "lit", "tokens_per_s": 300.0, "step_s": 2.0},
        {"workload": "dpo_lora", "framework": "trl", "tokens_per_s": 100.0, "step_s": 6.0},
        {"workload": "dpo_lora", "framework": "lit", "tokens_per_s": 100.0, "step_s": 4.0},
        {"workload": "dpo_lora", "framework": "trl", "tokens_per_s": 150.0, "step_s": 5.0, "peak_gib": 2.0,
         "peak_rss_gib": 3.0},
        {"workload": "dpo_lora", "framework": "lit", "tokens_per_s": 240.0, "step_s": 3.0, "peak_gib": 1.0,
         "peak_rss_gib": 2.0},
    ]
    rows = {r["metric"]: r for r in vs_trl.summarize(runs)}
    assert rows["tokens_per_s"]["lit"] == 240.0 and rows["tokens_per_s"]["trl"] == 125.0
    assert rows["tokens_per_s"]["lit_advantage"] == pytest.approx(240 / 125)  # higher is better: lit / TRL
    assert rows["step_s"]["lit_advantage"] == pytest.approx(5.5 / 3.0)  # lower is better: TRL / lit
    assert rows["peak_gib"]["lit_advantage"] == pytest.approx(2.0)
    assert rows["peak_rss_gib"]["lit_advantage"] == pytest.approx(1.5)  # CPU peak RSS: lower is better too
    assert "| dpo_lora | tokens_per_s | 240 | 125 | 1.92x |" in vs_trl.format_table(vs_trl.summarize(runs))


def test_steady_state_times_the_steps_after_warmup(vs_trl):
    probe = vs_trl.Probe("cpu", ends=[10.0, 11.0, 13.0, 16.0], tokens=[999, 999, 40, 80], cpu_ends=[5.0, 6.0, 7.0, 8.0])
    assert vs_trl.steady_state(probe, warmup=2, online=False) == {
        "step_s": 2.5, "tokens_per_s": 24.0, "timed_steps": 2, "cpu_step_s": 1.0, "tokens_per_cpu_s": 60.0}
    with pytest.raises(RuntimeError, match="more than warmup=4"):
        vs_trl.steady_state(probe, warmup=4, online=False)


def test_arguments_are_checked_before_anything_runs(vs_trl):
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--only", "dpo,ppo"])
    with pytest.raises(SystemExit, match="must exceed --warmup"):
        vs_trl.workload_of(vs_trl.parse_args(["--steps", "2", "--warmup", "2"]))
    gpu = vs_trl.workload_of(vs_trl.parse_args(["--size", "0.5b", "--device", "cuda", "--prompts", "8"]))
    assert (gpu.prompts, gpu.generations, gpu.prompt_len, gpu.new_tokens) == (8, 4, 128, 128)


def test_gpu_script_plans_every_part_under_its_timeout():
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": "/tmp/gpu_sh_test"}, timeout=30)
    assert done.returncode == 0, done.stderr
    parts = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("PART ")}
    assert sorted(parts) == ["decode", "dpo_1b", "grpo_0.5b"]
    assert sum(int(p.split("timeout ")[1].split("s)")[0]) for p in parts.values()) < 8 * 60
    assert "--only dpo_full,dpo_lora" in parts["dpo_1b"] and "--size 1b" in parts["dpo_1b"]
    assert "--prompts 16 --generations 4 --prompt-len 128 --new-tokens 128" in parts["grpo_0.5b"]
    assert "--batch 64 --new-tokens 128" in parts["decode"] and "--size 0.5b" in parts["decode"]
    bad = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), "--fast"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_probe_measures_the_peak_tensor_memory_of_one_step(vs_trl):
    import torch

    kept = torch.ones(4 * 2**20 // 4)  # live before the measured step: not counted
    probe = vs_trl.Probe("cpu", memory_step=2)
    probe.step_end()  # step 1 ends: step 2 is measured from here
    a = torch.ones(8 * 2**20 // 4)  # 8 MiB
    b = torch.ones(2 * 2**20 // 4)  # 2 MiB, with a: a 10 MiB peak
    del a, b
    c = torch.ones(3 * 2**20 // 4)  # 3 MiB after the peak
    probe.step_end()
    probe.step_end()  # step 3 is not measured
    assert probe.step_peak_mib == pytest.approx(10.0, abs=0.1)
    del kept, c
