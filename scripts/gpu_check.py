#!/usr/bin/env python3
"""The GPU check (scripts/gpu-check.sh runs this): everything the GPU path must show, from a
release `train` binary built elsewhere and the repo's fixtures, with no build and no network.

  scripts/gpu-check.sh [--device D] [--bin ./train] [--out DIR] [--no-peer]
  scripts/gpu-check.sh --dry-run      # the same steps on flex with tiny shapes (the test suite)
  scripts/gpu-check.sh --bundle DIR [--backend tch|cuda]
      # here: build the stripped release binary and copy it with what the check reads into DIR.
      # tch (default): libtorch from the torch==2.11.0 wheel, what the GPU machine's PyTorch
      # ships; the check then runs on tch:cuda:0. cuda: burn's CUDA backend (cuda:0).

Steps, each recorded in one JSON object printed at the end (also written to OUT/gpu-check.json):
  1. `train verify` on every golden model: logits (1e-4 in f32), KV cache, mixed padding, exact
     greedy tokens, and bf16 logits within the tolerance transformers' own bf16 pass needs.
  2. The tiny SFT, reward and PPO recipes end to end on the device (SFT and reward loss falling,
     PPO finite), each started from the previous one's checkpoint as the quickstart does.
  3. `train bench sft` on a Llama-2-7B shape (bf16 LoRA; full bf16 fine-tuning with activation
     checkpointing where its memory plan fits) and on a ~1B shape: tokens/s, model FLOP
     utilisation against the GPU's dense bf16 peak, peak GPU memory against the memory plan.
  4. `train bench generate` (batch 1 and 64) and `train bench ppo` at the ~1B shape.
  5. The PyTorch peer (scripts/gpu_peer_torch.py, this machine's own torch) on the same shapes.
Exits non-zero when any step fails; a step that cannot run (e.g. does not fit) says why.
"""

import argparse
import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = [
    "tests/fixtures/golden/tiny-gqa",
    "tests/fixtures/golden/tiny-odd",
    "tests/fixtures/golden/tiny-gqa-bf16-sharded",
    "tests/fixtures/golden-tf5/tiny-gqa",
    "tests/fixtures/golden-tf5/tiny-odd",
    "tests/fixtures/golden-tf5/tiny-gqa-bf16-sharded",
]
# What the check reads, relative to the repo root (the bundle copies these beside the binary).
BUNDLE = [
    "scripts/gpu-check.sh",
    "scripts/gpu_check.py",
    "scripts/gpu_peer_torch.py",
    "configs",
    "recipes",
    "datasets",
    "tests/fixtures/golden",
    "tests/fixtures/golden-tf5",
    "tests/fixtures/tokenizer",
]
# The libtorch the GPU machines we check on ship with PyTorch 2.11 (bundle --backend tch).
LIBTORCH_VERSION = "2.11.0"
LIBTORCH_DIR = "target/libtorch-2.11.0"
TCH_TARGET = "target/tch-2.11.0"
# What the GPU machines we check on accept, with room for the check's own outputs.
BUNDLE_LIMIT = 56 * 2**20
# Headers the bundle carries (see fetch_cuda_headers), and the headers burn's CUDA kernels
# include, which the check looks for before it starts.
HEADERS = "cuda-headers.tar.gz"
CUDA_HEADER_WHEELS = ["nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85"]
KERNEL_HEADERS = ["cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h", "cooperative_groups.h",
                  "nv/target", "cccl/cuda/barrier"]
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets; matched against
# nvidia-smi's name, most specific first.
PEAKS = [
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="flex, tiny shapes")
    parser.add_argument("--device", help="default: tch:cuda:0 in a libtorch bundle, else cuda:0; "
                                         "flex with --dry-run")
    parser.add_argument("--bin", help="the train binary (default: ./train, then target/release)")
    parser.add_argument("--out", help="work directory (default $OUT or a temporary one)")
    parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--skip", action="append", default=[], metavar="STEP",
                        help="leave a step out (repeatable), e.g. to split the check over calls")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds for the whole check (default 450; 0: none); a step that "
                             "would run past it stops and fails")
    parser.add_argument("--bundle", metavar="DIR", help="build and bundle; nothing is checked")
    parser.add_argument("--backend", choices=["tch", "cuda"], default="tch",
                        help="the bundle's GPU backend: libtorch 2.11 (tch:cuda:0) or burn's "
                             "CUDA backend (cuda:0); default tch")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.bundle:
        return bundle(args.bundle, args.backend)

    device = args.device or ("flex" if args.dry_run else default_gpu_device())
    binary = args.bin or next(
        (b for b in ["train", "target/release/train"] if os.path.isfile(b)), None
    )
    if not binary:
        print("gpu-check: no train binary (--bin, ./train or target/release/train)", file=sys.stderr)
        return 2
    out = args.out or os.environ.get("OUT") or os.path.join("/tmp", f"gpu-check-{os.getpid()}")
    work = os.path.join(os.path.abspath(out), "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ)
    if device.startswith("cuda"):
        env.update(cuda_environment())
    if device.startswith("tch:") or bundle_backend() == "tch":
        env.update(libtorch_environment())  # a libtorch build loads it whatever the device
    started = time.time()
    deadline = started + args.budget if args.budget > 0 else None
    report = os.path.join(os.path.abspath(out), "gpu-check.json")
    check = Check(os.path.abspath(binary), device, args.dry_run, work, env, deadline, report,
                  set(args.skip))
    check.result.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "commit": commit(),
            "device": device,
            "dry_run": args.dry_run,
            "gpu": gpu_name(),
            "cuda_path": env.get("CUDA_PATH"),
        }
    )
    if device.startswith("cuda"):
        check.result["cuda_headers_missing"] = missing_headers(env)
    check.step("verify", check.verify)
    check.step("tiny_recipes", check.tiny_recipes)
    check.step("bench_sft_7b_lora", lambda: check.bench_sft("bench-gpu-sft-7b-lora.toml"))
    check.step("bench_sft_7b_full", lambda: check.bench_sft("bench-gpu-sft-7b-full.toml"))
    check.step("bench_sft_1b", lambda: check.bench_sft("bench-gpu-sft-1b.toml"))
    check.step("bench_generate", check.bench_generate)
    check.step("bench_ppo_1b", check.bench_ppo)
    if not args.no_peer and not args.dry_run:
        check.step("peer_pytorch", check.peer)
    check.result["seconds"] = round(time.time() - started, 1)
    check.result["finished"] = True
    print(check.save())
    return 0 if not check.failures else 1


class Check:
    def __init__(self, binary, device, dry_run, work, env, deadline, report, skip):
        self.binary, self.device, self.dry_run, self.work, self.env = (
            binary, device, dry_run, work, env
        )
        self.deadline, self.report, self.skip = deadline, report, skip
        self.result = {"steps": {}, "skipped": sorted(skip)}
        self.failures = []

    def save(self):
        """Writes the report so far (after every step: a check cut short keeps what it did)."""
        self.result["passed"] = not self.failures
        self.result["failures"] = self.failures
        text = json.dumps(self.result, indent=1)
        with open(self.report, "w") as f:
            f.write(text + "\n")
        return text

    def step(self, name, run):
        if name in self.skip:
            return
        started = time.time()
        try:
            outcome = run()
        except StepFailed as e:
            outcome = {"passed": False, "error": str(e)}
        except Exception as e:  # a bug in this script must not hide the other steps
            outcome = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        outcome["seconds"] = round(time.time() - started, 1)
        if not outcome.get("passed", True):
            self.failures.append(name)
        self.result["steps"][name] = outcome
        self.save()
        print(f"gpu-check: {name}: {'ok' if outcome.get('passed', True) else 'FAILED'} "
              f"({outcome['seconds']} s)", file=sys.stderr)

    def train(self, args, timeout, sample_memory=False, allow_failure=False):
        """Runs `train ARGS`; returns (stdout, peak GPU memory in bytes or None), or with
        `allow_failure` (stdout, exit status)."""
        if self.deadline is not None:
            left = self.deadline - time.time()
            if left < 5:
                raise StepFailed("the check's time budget (--budget) is spent")
            timeout = min(timeout, left)
        sampler = GpuMemory(self.device) if sample_memory else None
        try:
            run = subprocess.run(
                [self.binary] + args, env=self.env, capture_output=True, text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise StepFailed(f"`train {' '.join(args[:3])}` ran past {timeout:.0f} s")
        finally:
            peak = sampler.stop() if sampler else None
        if allow_failure:
            return run.stdout, run.returncode
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["(no output)"])[-3:]
            raise StepFailed(f"`train {' '.join(args[:3])}` failed: {' | '.join(tail)}")
        return run.stdout, peak

    def verify(self):
        # A failed check still prints its measurements: keep them.
        stdout, status = self.train(
            ["verify", "--device", self.device, "--json"]
            + [a for g in GOLDEN for a in ["--model", g]],
            timeout=300, allow_failure=True,
        )
        models = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        outcome = {"passed": status == 0 and len(models) == len(GOLDEN), "models": models}
        if status != 0 and not models:
            outcome["error"] = f"`train verify` exited with {status} before any model"
        return outcome

    def tiny_recipes(self):
        """SFT, then a reward model, then PPO from both, as the quickstart chains them."""
        device = f'runtime.device="{self.device}"'
        short = self.dry_run
        sft_out = os.path.join(self.work, "sft-tiny")
        sft = self.run_recipe("sft", "recipes/sft-tiny.toml", sft_out, [device] + (
            ["train.max_steps=30", "train.eval_every=0", "train.save_every=30",
             "train.log_every=1"] if short else []
        ))
        policy = newest_checkpoint(sft_out)
        rm_out = os.path.join(self.work, "reward-tiny")
        reward = self.run_recipe("reward", "recipes/reward-tiny.toml", rm_out, [
            device, f'model.checkpoint="{policy}"'
        ] + (
            ["train.epochs=1", "train.eval_every=0"] if short else []
        ))
        rm = newest_checkpoint(rm_out)
        ppo_out = os.path.join(self.work, "ppo-tiny")
        ppo = self.run_recipe("ppo", "recipes/ppo-tiny.toml", ppo_out, [
            device,
            f'model.checkpoint="{policy}"',
            f'ppo.reward_model="{rm}"',
            f'ppo.safety_reward_model="{rm}"',
        ] + (["train.max_steps=2"] if short else []))
        sft["passed"] = sft["last_loss"] < sft["first_loss"]
        reward["passed"] = reward["last_loss"] < reward["first_loss"]
        ppo["passed"] = ppo["finite"] and ppo["steps"] > 0
        return {"passed": sft["passed"] and reward["passed"] and ppo["passed"],
                "sft": sft, "reward": reward, "ppo": ppo}

    def run_recipe(self, command, recipe, out, sets):
        args = [command, "--recipe", recipe, "--set", f'output.dir="{out}"']
        for s in sets:
            args += ["--set", s]
        started = time.time()
        self.train(args, timeout=600)
        lines = []
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                if line.strip():
                    lines.append(json.loads(line))
        losses = [m["loss"] for m in lines if isinstance(m.get("loss"), (int, float))]
        rewards = [m["reward_mean"] for m in lines if "reward_mean" in m]
        numbers = [v for m in lines for v in m.values() if isinstance(v, float)]
        quarter = max(1, len(losses) // 4)
        summary = {
            "seconds": round(time.time() - started, 1),
            "steps": len([m for m in lines if "step" in m]),
            "finite": all(math.isfinite(v) for v in numbers),
        }
        if losses:
            summary["first_loss"] = sum(losses[:quarter]) / quarter
            summary["last_loss"] = sum(losses[-quarter:]) / quarter
        if rewards:
            summary["first_reward_mean"], summary["last_reward_mean"] = rewards[0], rewards[-1]
        return summary

    def shrink(self, sets):
        """Tiny shapes for the dry run."""
        if not self.dry_run:
            return sets
        return sets + [
            'model.config="../configs/tiny-test.toml"',
            "data.max_seq_len=64",
            "train.loss_chunk=16",
        ]

    def bench_sft(self, recipe):
        recipe = os.path.join("recipes", recipe)
        sets = self.shrink([f'runtime.device="{self.device}"'])
        set_args = [a for s in sets for a in ["--set", s]]
        plan = self.plan(recipe, set_args)
        free = gpu_free_bytes(self.device)
        if free is not None and plan > free:
            return {"passed": True, "skipped": f"the memory plan ({plan / 2**30:.1f} GiB) "
                                              f"exceeds the GPU's free {free / 2**30:.1f} GiB"}
        stdout, peak = self.train(
            ["bench", "sft", "--recipe", recipe, "--steps", "1" if self.dry_run else "3",
             "--json"] + set_args,
            timeout=420, sample_memory=True,
        )
        report = json.loads(stdout.strip().splitlines()[-1])
        report["memory_plan_total_bytes"] = plan
        if peak is not None:
            report["peak_gpu_memory_bytes"] = peak
            report["peak_over_plan"] = peak / plan if plan else None
        peak_flops = gpu_peak_flops()
        if peak_flops:
            report["mfu"] = report["model_tflops_per_sec"] * 1e12 / peak_flops
        report["passed"] = report["tokens_per_sec"] > 0
        return report

    def plan(self, recipe, set_args):
        stdout, _ = self.train(["info", "--recipe", recipe, "--json"] + set_args, timeout=60)
        info = json.loads(stdout)
        return int(info["memory"]["total"])

    def bench_generate(self):
        config = "configs/tiny-test.toml" if self.dry_run else "configs/tinyllama-1.1b.toml"
        new = "8" if self.dry_run else "128"
        runs = []
        for batch in ["1", "64"]:
            stdout, _ = self.train(
                ["bench", "generate", "--config", config, "--device", self.device,
                 "--dtype", "bf16", "--batch", batch, "--prompt-len", "16",
                 "--new-tokens", new, "--cache-only", "--json"],
                timeout=300,
            )
            runs.append(json.loads(stdout.strip().splitlines()[-1]))
        return {"passed": all(r["tokens_per_sec"] > 0 for r in runs), "runs": runs}

    def bench_ppo(self):
        sets = self.shrink([f'runtime.device="{self.device}"'])
        if self.dry_run:
            sets += ["train.batch_size=4", "train.micro_batch_size=2", "ppo.max_new_tokens=8",
                     "data.max_seq_len=16"]
        stdout, peak = self.train(
            ["bench", "ppo", "--recipe", "recipes/bench-gpu-ppo-1b.toml", "--steps", "1",
             "--json"] + [a for s in sets for a in ["--set", s]],
            timeout=420, sample_memory=True,
        )
        report = json.loads(stdout.strip().splitlines()[-1])
        if peak is not None:
            report["peak_gpu_memory_bytes"] = peak
        report["passed"] = report["iteration_s"] > 0
        return report

    def peer(self):
        try:
            run = subprocess.run(
                [sys.executable, "scripts/gpu_peer_torch.py", "--json"],
                capture_output=True, text=True, timeout=600,
            )
        except subprocess.TimeoutExpired:
            raise StepFailed("the PyTorch peer ran past 600 s")
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["(no output)"])[-3:]
            raise StepFailed(f"the PyTorch peer failed: {' | '.join(tail)}")
        report = json.loads(run.stdout.strip().splitlines()[-1])
        peak_flops = gpu_peak_flops()
        for run_report in report.get("sft", []):
            if peak_flops and "model_tflops_per_sec" in run_report:
                run_report["mfu"] = run_report["model_tflops_per_sec"] * 1e12 / peak_flops
        report["passed"] = True
        return report


class StepFailed(Exception):
    pass


class GpuMemory:
    """The most GPU memory in use while a command runs, less what was in use before, from
    nvidia-smi every 100 ms (None without nvidia-smi or for a CPU device)."""

    def __init__(self, device):
        self.index = cuda_index(device)
        self.peak = None
        self.baseline = gpu_used_bytes(self.index) if self.index is not None else None
        self.running = self.baseline is not None
        if self.running:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()

    def sample(self):
        while self.running:
            used = gpu_used_bytes(self.index)
            if used is not None:
                self.peak = max(self.peak or 0, used)
            time.sleep(0.1)

    def stop(self):
        if not self.running:
            return None
        self.running = False
        self.thread.join()
        return None if self.peak is None else max(0, self.peak - self.baseline)


def cuda_index(device):
    name = device.removeprefix("tch:")
    if not name.startswith("cuda"):
        return None
    rest = name[4:].lstrip(":")
    return int(rest) if rest.isdigit() else 0


def nvidia_smi(query, index):
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i",
             str(index)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def gpu_used_bytes(index):
    text = nvidia_smi("memory.used", index)
    return int(text) * 2**20 if text and text.isdigit() else None


def gpu_free_bytes(device):
    index = cuda_index(device)
    text = nvidia_smi("memory.free", index) if index is not None else None
    return int(text) * 2**20 if text and text.isdigit() else None


def gpu_name():
    return nvidia_smi("name", 0)


def gpu_peak_flops():
    name = gpu_name() or ""
    return next((peak for key, peak in PEAKS if key in name), None)


def newest_checkpoint(out):
    steps = [
        int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(out, "checkpoint-*"))
        if p.rsplit("-", 1)[1].isdigit()
    ]
    if not steps:
        raise StepFailed(f"{out}: no checkpoint written")
    return os.path.join(out, f"checkpoint-{max(steps)}")


def commit():
    if os.path.isfile("COMMIT"):  # written by --bundle
        return open("COMMIT").read().strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def cuda_environment():
    """What burn's CUDA backend needs from a machine whose only CUDA is the PyTorch wheels'
    libraries: NVRTC (and its builtins) on LD_LIBRARY_PATH, and a CUDA_PATH whose include/ holds
    the headers NVRTC compiles kernels against (include/cccl for CCCL). Uses an installed
    toolkit (CUDA_PATH, /usr/local/cuda) when there is one; otherwise links the nvidia-* wheels'
    include directories, then the headers the bundle carries, into one include/."""
    if os.environ.get("CUDA_PATH") or os.path.isdir("/usr/local/cuda/include"):
        return {}
    includes, libs = [], []
    for entry in sys.path:
        root = os.path.join(entry, "nvidia")
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if os.path.basename(dirpath) == "include":
                includes.append(dirpath)
                dirnames[:] = []
            elif os.path.basename(dirpath) == "lib" and any(".so" in f for f in filenames):
                libs.append(dirpath)
    cuda_path = os.path.join("/tmp", f"gpu-check-cuda-{os.getpid()}")
    if os.path.isfile(os.path.join(ROOT, HEADERS)):
        import tarfile

        with tarfile.open(os.path.join(ROOT, HEADERS)) as tar:
            tar.extractall(os.path.join(cuda_path, "bundled"), filter="data")
        includes.append(os.path.join(cuda_path, "bundled", "include"))
    link_union(includes, os.path.join(cuda_path, "include"))
    env = {"CUDA_PATH": cuda_path}
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def link_union(sources, target):
    """`target` holding every entry of the `sources` directories as links, merging directories
    that several hold (the first source's files win)."""
    os.makedirs(target, exist_ok=True)
    for source in sources:
        if not os.path.isdir(source):
            continue
        for name in os.listdir(source):
            path, link = os.path.join(source, name), os.path.join(target, name)
            if not os.path.lexists(link):
                os.symlink(path, link)
            elif os.path.isdir(path) and os.path.isdir(link):
                if os.path.islink(link):  # a linked directory becomes a merged one
                    first = os.readlink(link)
                    os.unlink(link)
                    link_union([first], link)
                link_union([path], link)


def missing_headers(env):
    include = os.path.join(env.get("CUDA_PATH") or "/usr/local/cuda", "include")
    # NVRTC searches include/ and include/cccl (where CCCL 13 keeps nv/target).
    roots = [include, os.path.join(include, "cccl")]
    return [h for h in KERNEL_HEADERS
            if not any(os.path.exists(os.path.join(root, h)) for root in roots)]


def fetch_cuda_headers(archive):
    """NVIDIA's `crt/` (which mma.h includes) and CCCL's libcu++ (`cuda/barrier`, and
    `nv/target`, which cooperative_groups.h includes) for machines whose CUDA is only PyTorch's
    wheels, which do not depend on them: the headers of the nvidia-cuda-crt and nvidia-cuda-cccl
    wheels of the CUDA 13.0 that torch 2.11 pins (CUB and Thrust left out), downloaded here (the
    GPU machine has no network) into a gzipped tar of `include/`."""
    import tarfile
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        if subprocess.run(pip + CUDA_HEADER_WHEELS).returncode != 0:
            print("gpu-check: could not download " + " ".join(CUDA_HEADER_WHEELS) + "; kernels "
                  "that need mma.h or CCCL will not compile where CUDA is only PyTorch's",
                  file=sys.stderr)
            return
        prefix = "nvidia/cu13/include/"
        with tarfile.open(archive, "w:gz") as tar:
            for wheel in sorted(glob.glob(os.path.join(tmp, "*.whl"))):
                with zipfile.ZipFile(wheel) as z:
                    for info in z.infolist():
                        name = info.filename
                        if (not name.startswith(prefix) or name.endswith("/")
                                or name.startswith(prefix + "cccl/cub/")
                                or name.startswith(prefix + "cccl/thrust/")):
                            continue
                        member = tarfile.TarInfo("include/" + name[len(prefix):])
                        data = z.read(name)
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))


def bundle_backend():
    """What the bundle's binary was built with (its BACKEND file), or None outside a bundle."""
    if os.path.isfile("BACKEND"):
        return open("BACKEND").read().strip()
    return None


def default_gpu_device():
    """`tch:cuda:0` for a bundle built on libtorch, else `cuda:0`."""
    return "tch:cuda:0" if bundle_backend() == "tch" else "cuda:0"


def libtorch_environment():
    """A binary built against the torch 2.11 wheel (bundle --backend tch) loads this machine's
    PyTorch: its torch/lib on LD_LIBRARY_PATH (which finds the nvidia-* wheels by RUNPATH)."""
    for entry in sys.path:
        lib = os.path.join(entry, "torch", "lib")
        if os.path.isfile(os.path.join(lib, "libtorch_cpu.so")):
            rest = os.environ.get("LD_LIBRARY_PATH", "")
            return {"LD_LIBRARY_PATH": ":".join([lib, rest]).rstrip(":")}
    return {}


def bundle(out, backend):
    """Builds the stripped release binary for the GPU machine and copies it, with everything
    the check reads, into OUT (which must not exist). `tch`: against the libtorch of the
    `torch==2.11.0` wheel, what that machine's PyTorch ships (downloaded once into
    target/libtorch-2.11.0, headers and libraries only; tch's check for libtorch 2.9 bypassed),
    built into target/tch-2.11.0. `cuda`: burn's CUDA backend."""
    if os.path.exists(out):
        print(f"gpu-check: {out} exists; give a new directory", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if backend == "tch":
        libtorch = fetch_libtorch(LIBTORCH_DIR)
        if not libtorch:
            return 1
        for key in ["LIBTORCH_USE_PYTORCH", "LIBTORCH_INCLUDE", "LIBTORCH_LIB"]:
            env.pop(key, None)
        # Absolute: torch-sys's build script runs in its own directory.
        env.update({"LIBTORCH": os.path.abspath(libtorch), "LIBTORCH_BYPASS_VERSION_CHECK": "1",
                    "CARGO_TARGET_DIR": os.path.abspath(TCH_TARGET)})
        build = ["cargo", "build", "--release", "-p", "cli", "--features", "cli/tch"]
        binary = os.path.join(TCH_TARGET, "release", "train")
    else:
        build = ["cargo", "build", "--release", "-p", "cli", "--features", "cli/cuda"]
        binary = "target/release/train"
    print("gpu-check: " + " ".join(build), file=sys.stderr)
    if subprocess.run(build, env=env).returncode != 0:
        if backend == "cuda":
            print("gpu-check: the build failed. burn's CUDA backend (cubecl-cuda 0.11) links a "
                  "prebuilt LLVM 23.1 that its build downloads from "
                  "github.com/tracel-ai/tracel-llvm once; offline, see README (\"Backends and "
                  "devices\")", file=sys.stderr)
        return 1
    os.makedirs(out)
    shutil.copy2(binary, os.path.join(out, "train"))
    subprocess.run(["strip", os.path.join(out, "train")], check=False)
    for path in BUNDLE:
        target = os.path.join(out, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(path):
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
    if backend == "cuda":
        fetch_cuda_headers(os.path.join(out, HEADERS))
    with open(os.path.join(out, "BACKEND"), "w") as f:
        f.write(backend + "\n")
    with open(os.path.join(out, "COMMIT"), "w") as f:
        f.write((commit() or "unknown") + "\n")
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files
    )
    print(f"gpu-check: bundle {out}: {size / 2**20:.1f} MiB; on the GPU machine run "
          f"scripts/gpu-check.sh from inside it", file=sys.stderr)
    if size > BUNDLE_LIMIT:
        print(f"gpu-check: the bundle exceeds the {BUNDLE_LIMIT // 2**20} MiB a GPU check may "
              f"carry", file=sys.stderr)
        return 1
    return 0


def fetch_libtorch(target):
    """`target`/torch with the include/ and lib/ of the torch==2.11.0 wheel (about 1 GB; the
    wheel itself is deleted). Returns the libtorch directory, or None."""
    import tempfile
    import zipfile

    libtorch = os.path.join(target, "torch")
    done = os.path.join(target, ".complete")
    if os.path.isfile(done):
        return libtorch
    shutil.rmtree(target, ignore_errors=True)  # an extraction cut short
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"torch=={LIBTORCH_VERSION}"]
        print("gpu-check: " + " ".join(pip[1:]), file=sys.stderr)
        if subprocess.run(pip).returncode != 0:
            print("gpu-check: could not download torch; see README (\"GPU check\")",
                  file=sys.stderr)
            return None
        for wheel in glob.glob(os.path.join(tmp, "torch-*.whl")):
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if info.filename.startswith(("torch/include/", "torch/lib/")):
                        z.extract(info, target)
    for lib in glob.glob(os.path.join(libtorch, "lib", "*.so*")):
        os.chmod(lib, 0o755)
    if not os.path.isdir(os.path.join(libtorch, "lib")):
        return None
    open(done, "w").close()
    return libtorch


if __name__ == "__main__":
    sys.exit(main())
