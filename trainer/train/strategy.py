"""The one module that drives DeepSpeed in training: distributed init, ZeRO-3 model
construction, the engine, backward/step, checkpoints and gathers. The rest of training never
imports deepspeed (reading ZeRO checkpoint files without an engine is trainer/export/zero_files.py).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import warnings
from pathlib import Path

import torch

from hamburger.assets import resolve_model
from hamburger.dtypes import resolve_dtype
from hamburger.model import HAMburgerModel
from hamburger.model.lora import add_lora
from trainer.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


ZERO2_SHARE = 0.5
"""ds_config auto takes ZeRO-2 on GPU when its model states fit in this share of one device's
memory (the rest is for activations, the loss chunk and fragmentation)."""


def zero2_bytes_per_gpu(params: int, world_size: int) -> int:
    """Model states per GPU under ZeRO-2 with bf16 and AdamW: the bf16 parameters whole on every
    rank (2 bytes each), the bf16 gradients, fp32 master weights and both Adam moments
    (2 + 4 + 8 bytes) partitioned over the ranks."""
    return 2 * params + (14 * params) // max(world_size, 1)


def auto_ds_config(params: int, world_size: int, device_bytes: int | None) -> tuple[str, str]:
    """(file in ds_configs/, why) for `ds_config: auto`. CPU: ZeRO-3 (the demo and tests run
    every rank's partitions). GPU: ZeRO-2 when its model states fit ZERO2_SHARE of one device
    (no per-module gathers: the 0.9 ms of host time per module call that ZeRO-3 pays, even on
    one GPU), else ZeRO-3."""
    if device_bytes is None:
        return "zero3_cpu.json", "CPU ranks"
    need = zero2_bytes_per_gpu(params, world_size)
    gib = f"{need / 2**30:.1f} of {device_bytes / 2**30:.0f} GiB"
    if need <= ZERO2_SHARE * device_bytes:
        return "zero2_bf16.json", f"ZeRO-2: its model states need {gib} per GPU"
    return "zero3_bf16.json", f"ZeRO-3: ZeRO-2's model states would need {gib} per GPU"


def count_parameters(base_path: str, hamburger) -> int:
    """Parameters of the base (built on the meta device from its config: nothing is loaded)
    plus the grafted modules, as the optimiser will hold them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
        model = HAMburgerModel(base, hamburger)
    return sum(p.numel() for p in model.parameters())


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """Load the DeepSpeed file and fill what the training config owns; a conflict is an error."""
    path = cfg.ds_config
    if path == "auto":
        device_bytes = torch.cuda.get_device_properties(0).total_memory if use_cuda() else None
        params = count_parameters(resolve_model(cfg.model.base), cfg.model.hamburger) if device_bytes else 0
        name, why = auto_ds_config(params, world_size, device_bytes)
        if device_bytes and int(os.environ.get("RANK", "0")) == 0:
            print(f"[train] ds_config auto: ds_configs/{name} ({why})", flush=True)
        path = str(ROOT / "ds_configs" / name)
    if not Path(path).is_file():
        raise FileNotFoundError(f"ds_config: {path} not found")
    ds = json.loads(Path(path).read_text())
    owned = {
        "train_micro_batch_size_per_gpu": 1,  # one packed micro-batch (token budget) per rank
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in owned.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(
                f'{path}: {key}={ds[key]} disagrees with the training config ({value}); set it to "auto"'
            )
        ds[key] = value
    ds["train_batch_size"] = world_size * cfg.optim.grad_accum
    bf16 = precision_is_bf16(cfg)
    bf16_block = ds.setdefault("bf16", {})
    if bf16_block.get("enabled", "auto") not in ("auto", bf16):
        raise ValueError(
            f"{path}: bf16.enabled={bf16_block['enabled']} disagrees with precision={cfg.precision}"
        )
    bf16_block["enabled"] = bf16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{path}: fp16 is not supported (use bf16)")
    ds.setdefault("zero_optimization", {}).setdefault("stage", 3)
    return ds


def precision_is_bf16(cfg: TrainConfig) -> bool:
    return resolve_dtype(cfg.precision, "cuda" if use_cuda() else "cpu") == torch.bfloat16


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, floor_ratio: float):
    """Linear warm-up, then cosine decay to floor_ratio x each group's learning rate
    (transformers' schedule: both groups keep their ratio to lr_base down to the floor)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, min_lr_rate=min(max(floor_ratio, 0.0), 1.0)
    )


class DeepSpeedStrategy:
    """DeepSpeed, behind a small surface: setup -> build_model -> prepare -> step/save/load."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.engine = None
        self._hf_ds_config = None  # must stay alive while ZeRO-3 models are built

    # ---------------------------------------------------------------- distributed
    def setup_distributed(self) -> None:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if os.environ["WORLD_SIZE"] == "1":
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
        warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
        import deepspeed

        if not use_cuda():
            # The shared-memory comm op costs minutes of JIT compile on CPU; gloo needs none of it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda() else "gloo",
            timeout=datetime.timedelta(seconds=self.cfg.dist_timeout_s),
        )
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.local_rank = int(os.environ["LOCAL_RANK"])
        if use_cuda():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.ds_config = build_ds_config(self.cfg, self.world_size)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def release(self) -> None:
        """Free this run's engine (its partitions, optimiser state and hooks) and wait for every
        rank, keeping the process group for the next run in this job."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = self.optimizer = self.scheduler = None
        self._hf_ds_config = None
        import gc

        gc.collect()
        torch.distributed.barrier()

    def shutdown(self) -> None:
        """Ranks leave together: one that tears down its process group while another still
        finishes (rank 0 closing the MLflow run) can abort in gloo's threads at exit."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # ---------------------------------------------------------------- model
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.precision, "cuda" if use_cuda() else "cpu")

    def build_model(self, base_path: str) -> HAMburgerModel:
        """Base loaded partitioned (ZeRO-3 via HfDeepSpeedConfig, HF initialisation kept); the new
        modules are built whole from the same seed on every rank and partitioned by
        deepspeed.initialize, which broadcasts rank 0's values: they never read a size-0 shard."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        mcfg = self.cfg.model
        if self.ds_config["zero_optimization"]["stage"] == 3:
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        kw = dict(dtype=self.dtype(), attn_implementation=mcfg.attn_implementation)
        base = AutoModelForCausalLM.from_pretrained(base_path, **kw)
        teacher = (
            AutoModelForCausalLM.from_pretrained(base_path, **kw) if mcfg.hamburger.kl_weight > 0 else None
        )
        torch.manual_seed(self.cfg.seed)
        model = HAMburgerModel(base, mcfg.hamburger, teacher=teacher)
        if mcfg.hamburger.micro_init == "base_top":
            # Every rank gathers the same partitioned base weights and copies them into its whole
            # (not yet partitioned) micro decoder, so all ranks hold identical values.
            import deepspeed

            with deepspeed.zero.GatheredParameters(model.base_top_params(), modifier_rank=None):
                model.copy_base_top_into_micro()
        for module in model.new_modules():  # the base is already in dtype (and maybe partitioned)
            module.to(self.dtype())
        if mcfg.base_training == "lora":
            torch.manual_seed(self.cfg.seed + 1)  # A's initialisation, the same on every rank
            for p in add_lora(base, mcfg.lora):
                p.data = p.data.to(self.dtype())
        elif self.cfg.base_training == "frozen":  # optim.lr_base 0 included
            base.requires_grad_(False)  # no gradient, so no fp32 gradient or Adam state either
        if mcfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        return model

    @torch.no_grad()
    def load_weights(self, model: HAMburgerModel, state: dict) -> None:
        """Copy `state` (tensors by parameter name, lazy ones materialised one at a time) into the
        model before `prepare`: a ZeRO-3-partitioned parameter is gathered and written by rank 0
        (its values are what re-partitioning keeps, and what the optimiser's fp32 copy starts
        from); a whole one is written on every rank."""
        import deepspeed

        params = dict(model.named_parameters())
        for name, src in state.items():
            p = params[name]
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.is_rank0:
                        p.data.copy_(src.contiguous())
            else:
                p.data.copy_(src.contiguous())

    def prepare(self, model: HAMburgerModel, total_steps: int) -> None:
        import deepspeed

        o = self.cfg.optim
        new_ids = {id(p) for m in model.new_modules() for p in m.parameters()}
        base_params = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in new_ids]
        new_params = [p for m in model.new_modules() for p in m.parameters()]
        groups = [{"params": new_params, "lr": o.lr_new, "name": "new"}]
        if base_params:  # the whole base (full), its adapters (lora), or nothing (frozen)
            name = "lora" if self.cfg.model.base_training == "lora" else "base"
            groups.insert(0, {"params": base_params, "lr": o.lr_base, "name": name})
        zero = self.ds_config["zero_optimization"]
        offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        optimizer = torch.optim.AdamW(
            groups,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=use_cuda() and not offloaded,  # one kernel for all tensors instead of one per tensor
        )
        top = o.lr_base if base_params else o.lr_new  # the floor scales with the top rate that trains
        scheduler = lr_schedule(optimizer, o.warmup_steps, total_steps, o.min_lr / top if top else 0.0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )

    @property
    def model(self) -> HAMburgerModel:
        return self.engine.module

    # ---------------------------------------------------------------- step
    def forward(self, batch):
        return self.engine(batch.to(self.device))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lrs(self) -> dict[str, float]:
        return {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        """Every rank writes its partition; DeepSpeed writes `latest` last."""
        self.engine.save_checkpoint(folder, tag=tag, client_state=client_state)

    def load_checkpoint(self, folder: str, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(folder, tag=tag)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {folder}/{tag}")
        return client_state

    # ---------------------------------------------------------------- gathers (every rank joins)
    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model state on rank 0 (None elsewhere); every rank must call this."""
        import deepspeed

        model = self.engine.module
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.is_rank0:
                return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return None
