"""Launch configs: accelerate resolves each one to the launcher and plugin it is meant to pick,
each one starts a run on CPU, the DeepSpeed JSONs leave to accelerate only what it fills, and
slurm.sh wires ranks per node.

The two-rank CPU run itself is tests/test_trainer.py::test_two_process_ddp_matches_one_process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

# Private helpers, but they are exactly what `accelerate launch` runs before starting processes:
# resolving a config file into launcher arguments and the environment the ranks receive.
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from leaplm.models.zoo import TINY_FAMILIES

from conftest import RECIPE_SMOKE

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))

# config -> the launcher flag accelerate must derive from it (None: the single-process launcher)
LAUNCHER_FLAG = {
    "cpu": "multi_gpu",  # torchrun starts the 2 ranks; Accelerator(cpu=True) makes them gloo CPU ranks
    "single_gpu": None,
    "multi_gpu": "multi_gpu",
    "fsdp": "use_fsdp",
    "zero2": "use_deepspeed",
    "zero3": "use_deepspeed",
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name each other relative to the repository root, as documented


def resolve(name: str):
    """What `accelerate launch --config_file launch/accelerate/<name>.yaml -m leaplm.train C` resolves to:
    the launcher arguments, the loaded file, and whether the file set mixed_precision."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", f"launch/accelerate/{name}.yaml", "-m", "leaplm.train", "c.yaml"])
    return _validate_launch_command(args)


def test_the_named_configs_exist():
    assert {p.stem for p in CONFIGS} == set(LAUNCHER_FLAG)


@pytest.mark.parametrize("name", LAUNCHER_FLAG)
def test_accelerate_loads_each_config_and_picks_its_launcher(name):
    path = LAUNCH / "accelerate" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank"} <= raw.keys()
    load_config_from_file(str(path))  # accelerate's own loader: rejects keys this version does not know
    args, *_ = resolve(name)
    flags = {flag for flag in ("multi_gpu", "use_fsdp", "use_deepspeed") if getattr(args, flag)}
    assert flags == ({LAUNCHER_FLAG[name]} if LAUNCHER_FLAG[name] else set())
    assert args.num_processes == raw["num_processes"]
    # Precision belongs to the recipe config (train.mixed_precision), which the Trainer passes on.
    assert args.mixed_precision == "no"


def test_cpu_config_starts_two_ranks_on_a_free_port():
    args, *_ = resolve("cpu")
    assert args.use_cpu and args.num_processes == 2 and args.main_process_port == 0
    prepare_multi_gpu_env(args)  # what torchrun is then given
    assert args.nproc_per_node == "2" and args.main_process_port > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fsdp_config_is_fsdp2_full_shard_wrapping_each_decoder_layer(tiny, family):
    args, *_ = resolve("fsdp")
    env = prepare_multi_gpu_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap is None  # left to the model, so any family works
    model, _ = tiny(family)
    plugin.set_auto_wrap_policy(model)
    layer = type(model.model.layers[0]).__name__
    assert plugin.transformer_cls_names_to_wrap == [layer], (family, layer)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_reach_the_plugin(stage):
    args, defaults, mixed_precision_from_file = resolve(f"zero{stage}")
    # As launch_command does: every rank's DeepSpeedPlugin refuses to start if the file set any of these
    # fields next to deepspeed_config_file, mixed_precision included.
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_file else [])]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"launch/deepspeed/zero{stage}.json"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.hf_ds_config.is_zero3() == (stage == 3)
    assert plugin.zero3_init_flag == (stage == 3)


# "auto" values that accelerate fills from the run at prepare(): precision, accumulation, clipping,
# batch (from the micro-batch size), and ZeRO-3 bucket sizes from the model's hidden_size.
ACCELERATE_FILLS = {
    "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
    "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
}


def auto_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_leaves_only_what_accelerate_fills(stage):
    config = json.loads((LAUNCH / "deepspeed" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert auto_keys(config) <= ACCELERATE_FILLS, auto_keys(config) - ACCELERATE_FILLS
    assert {"train_batch_size", "gradient_accumulation_steps", "bf16.enabled"} <= auto_keys(config)
    # No optimizer or scheduler: the Trainer's own AdamW and LR schedule run under every config.
    assert not {"optimizer", "scheduler"} & config.keys()


def test_docs_name_only_files_that_exist():
    guide = (LAUNCH / "README.md").read_text()
    assert all(f"`{p.name}`" in guide for p in CONFIGS)  # every config is documented
    named = set(re.findall(r"launch/[\w/.-]+\.(?:yaml|json|sh)", guide + (REPO / "README.md").read_text()))
    assert all((REPO / p).is_file() for p in named), [p for p in named if not (REPO / p).is_file()]


# ----- every config starts a run on this CPU machine ---------------------------------------------

# Without CUDA the Trainer builds Accelerator(cpu=True), which ignores the FSDP or DeepSpeed plugin the
# launcher asks for: the ranks run plain DDP over gloo, and the main process says so in one line.
FALLBACK = {
    "cpu": None,
    "single_gpu": None,
    "multi_gpu": None,
    "fsdp": "launch config asks for FSDP; on CPU this runs as plain DDP over gloo: no sharding",
    "zero2": "launch config asks for DeepSpeed (launch/deepspeed/zero2.json); on CPU this runs as plain DDP over gloo: "
             "no sharding",
    "zero3": "launch config asks for DeepSpeed (launch/deepspeed/zero3.json); on CPU this runs as plain DDP over gloo: "
             "no sharding",
}


# 10-30 s a start on 2 shared cores: only cpu.yaml's runs by default, the rest in the slow selection.
@pytest.mark.parametrize("name", [name if name == "cpu" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in FALLBACK])
def test_each_config_starts_a_run_on_cpu(tmp_path, name):
    """The documented command with each shipped file: every process starts and finishes its steps.
    Parsing a config proves little: accelerate checks some fields only when each rank builds its
    Accelerator (a DeepSpeed file that also sets mixed_precision fails exactly there)."""
    processes = 1 if name == "single_gpu" else 2
    # --main_process_port 0: the GPU files pin 29500, which concurrent launches on one machine would share.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{name}.yaml",
           "--num_processes", str(processes), "--main_process_port", "0",
           "-m", "leaplm.train", "configs/pretrain/tiny_teacher.yaml", f"output_dir={tmp_path}", "train.max_steps=2",
           "data.train_per_task=50", "model.init.num_hidden_layers=1", "eval.at_end=false", "export.dir=null",
           "logging.wandb=false", "logging.progress_bar=false"]
    # No visible GPU, so that on a GPU box too this checks the CPU fallback (single_gpu.yaml's gpu_ids
    # makes GPU 0 visible again; it has no fallback to check).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"trained 2 steps; outputs in {tmp_path}") == processes, proc.stdout[-2000:]
    said = [line for line in proc.stderr.splitlines() if "launch config asks for" in line]
    assert said == ([f"WARNING leaplm.train.trainer: {FALLBACK[name]}"] if FALLBACK[name] else []), said


# ----- slurm.sh ---------------------------------------------------------------------------------

SLURM = LAUNCH / "slurm.sh"

# Stand-ins for the SLURM tools and accelerate: srun runs the task once per node with that
# node's SLURM_NODEID, as SLURM does; accelerate prints the arguments it was given, one line per node.
STUBS = {
    "srun": '[[ $1 == --kill-on-bad-exit=1 ]] && shift\n'
            'for ((id = 0; id < SLURM_NNODES; id++)); do SLURM_NODEID=$id "$@"; done\n',
    "scontrol": "printf 'gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n'\n",
    "accelerate": "printf '%s\\x1f' \"$@\"; echo\n",
}


def run_slurm(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO), **env}
    return subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)


def test_slurm_launches_one_accelerate_per_node_with_its_rank(tmp_path):
    overrides = ["train.lr=3e-4", "eval.tasks=[copy, sort]"]
    proc = run_slurm(tmp_path, ["configs/pretrain/tiny_teacher.yaml", *overrides],
                     SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu-node-[07-09]", SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 0, proc.stderr
    calls = [line.split("\x1f")[:-1] for line in proc.stdout.splitlines() if "\x1f" in line]
    assert len(calls) == 3
    for rank, argv in enumerate(calls):
        assert argv == [
            "launch", "--config_file", "launch/accelerate/multi_gpu.yaml", "--num_machines", "3",
            "--num_processes", "12", "--machine_rank", str(rank), "--main_process_ip", "gpu-node-07",
            "--main_process_port", "29500", "-m", "leaplm.train", "configs/pretrain/tiny_teacher.yaml",
            "train.resume_from=latest", *overrides,
        ]


def test_slurm_takes_the_accelerate_config_and_sizes_from_the_environment(tmp_path):
    proc = run_slurm(tmp_path, ["configs/pretrain/tiny_teacher.yaml"], SLURM_NNODES="2", SLURM_JOB_NODELIST="x",
                     ACCELERATE_CONFIG="launch/accelerate/zero3.yaml", GPUS_PER_NODE="2", MAIN_PORT="1234")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[1].split("\x1f")
    assert first[first.index("--config_file") + 1] == "launch/accelerate/zero3.yaml"
    assert first[first.index("--num_processes") + 1] == "4"
    assert first[first.index("--main_process_port") + 1] == "1234"


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {"SLURM_NNODES": "2"}, "usage: sbatch"),
        (["configs/pretrain/tiny_teacher.yaml"], {}, "SLURM_NNODES is unset: submit this script with sbatch"),
        (["configs/absent.yaml"], {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "x"}, "configs/absent.yaml not found"),
    ],
)
def test_slurm_misuse_fails_with_the_reason(tmp_path, args, env, message):
    proc = run_slurm(tmp_path, args, **env)
    assert proc.returncode != 0 and message in proc.stderr
    assert "\x1f" not in proc.stdout  # nothing was launched


DEEPSPEED_STEP = """
import sys, torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from leaplm.models.zoo import tiny_model

acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=sys.argv[1]))
# The one "auto" accelerate cannot derive without a DataLoader (the Trainer batches by itself):
# whoever prepares the model must set it from train.micro_batch_size first.
acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
model, _ = tiny_model("llama")
model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
ids = torch.randint(0, 500, (2, 16))
loss = model(input_ids=ids, labels=ids).loss
acc.backward(loss)
optimizer.step()
print("stage", model.zero_optimization_stage(), "loss", round(loss.item(), 3))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_accepts_the_json_and_takes_a_step(tmp_path, stage):
    """DeepSpeed validates its config only at initialize(): one process, on CPU (its CPU accelerator)."""
    script = tmp_path / "step.py"
    script.write_text(DEEPSPEED_STEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           f"launch/deepspeed/zero{stage}.json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"stage {stage} loss" in proc.stdout


# ----- every recipe under the 2-rank CPU config -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPE_SMOKE))
def test_each_recipe_trains_under_two_cpu_ranks(tmp_path, recipe):
    """`accelerate launch --config_file launch/accelerate/cpu.yaml` on each landed recipe's smoke run:
    both gloo ranks train (rollout recipes shard their rollouts by rank and merge them), and the
    checkpoint is complete."""
    from leaplm.ship import checkpoint as ckpt
    from leaplm.train.recipes import get_recipe

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           "-m", "leaplm.train", f"configs/{recipe}/tiny_teacher.yaml", *RECIPE_SMOKE[recipe],
           "train.log_every=1", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "stage_1" if (tmp_path / "stage_1").is_dir() else tmp_path
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    assert ckpt.validate(ckpt.list_checkpoints(run)[-1])["step"] == 2
    if get_recipe(recipe).rollout is not None:
        assert not list((run / "rollouts").rglob("*.shards")), "rank shards were not merged"
        assert list((run / "rollouts").rglob("dataset_info.json"))


@pytest.mark.slow
def test_sigterm_to_a_two_rank_launch_checkpoints_on_every_rank(tmp_path):
    """SLURM preemption signals the launcher; torchrun forwards SIGTERM to both ranks, which finish
    the step in flight, write one checkpoint together and exit. (torchrun itself then exits with
    its SignalException: the launcher's status, not the ranks'.)"""
    from leaplm.ship import checkpoint as ckpt

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           "-m", "leaplm.train", "configs/pretrain/tiny_teacher.yaml", *RECIPE_SMOKE["pretrain"],
           "train.max_steps=100000", "train.micro_batch_size=4", "train.log_every=1", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert ckpt.validate(ckpt.list_checkpoints(tmp_path)[-1])["step"] == logged[-1]
    assert output.count(f"preempted: checkpoint at step {logged[-1]}") == 2, output[-3000:]
