"""The reference side of a token score: where it comes from, whether it fits, how it is loaded, prepared for the
run's distributed type, identified for the score cache, and released after its last use.

A reference is one of three things: a `ref_model=` object, a full model at `ref_model_name_or_path` (loaded only when
its scores are not all cached), or a PEFT adapter at `ref_adapter_name_or_path` loaded next to the trained adapter on
the same base, so no second model is ever in memory.

Preparation follows the way TRL's DPO trainer prepares its reference: under DeepSpeed an engine of its own in eval
mode (sharded like the policy under ZeRO-3), under FSDP sharded like the policy, otherwise on the process's device.
`device_map` is never `"auto"` when more than one process runs (that would spread 8 copies over 8 GPUs).
"""

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoTokenizer
from trl.trainer.utils import use_adapter

from .distributed import decide_on_main
from .scoring import preserve_rng_state, scoring_mixed_precision, unwrap_causal_lm
from .utils import file_provenance, fingerprint_module, is_peft_model, sha256_json

logger = logging.getLogger(__name__)

REF_ADAPTER_NAME = "token_clean_ref"


def config_vocab_size(model_or_config) -> int | None:
    """Vocabulary size from a model's config (never from parameter shapes: a ZeRO-3 partition has shape `[0]`)."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def raise_if_vocab_differs(ref_vocab: int | None, vocab_size: int | None, what: str) -> None:
    if ref_vocab is not None and vocab_size is not None and ref_vocab != vocab_size:
        raise ValueError(
            f"The reference ({what}) has a vocabulary of {ref_vocab} tokens but the trained model has {vocab_size}. "
            "Token scores compare the two models' losses on the same token ids, so the reference must share the "
            "trained model's tokenizer (e.g. a fine-tune of the same base)."
        )


def weights_dtype(model: torch.nn.Module) -> str:
    """The dtype a model's weights are in (its first floating-point parameter): `"bfloat16"`, `"float32"`, ..."""
    for parameter in unwrap_causal_lm(model).parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype).replace("torch.", "")
    return "none"


def base_weights_key(model) -> str:
    """Fingerprint of a PEFT model's base weights: every tensor except those of its adapters."""
    adapter_names = tuple(model.peft_config)
    return fingerprint_module(model, include=lambda name: not any(f".{a}." in name for a in adapter_names))


def prepare_reference(ref_model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A frozen reference ready for no-grad forwards under the run's distributed type."""
    ref_model.requires_grad_(False)
    ref_model.eval()
    distributed = accelerator.distributed_type
    if distributed == DistributedType.DEEPSPEED:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(ref_model, accelerator)
    if distributed == DistributedType.FSDP:
        from trl.models import prepare_fsdp

        return prepare_fsdp(ref_model, accelerator)
    if getattr(ref_model, "hf_device_map", None) and accelerator.num_processes == 1:
        return ref_model  # a single process may spread a large reference over its devices on purpose
    return ref_model.to(accelerator.device)


class Reference:
    """
    The reference of one trainer.

    Args:
        args ([`TokenCleanConfig`]):
            The run's config (`ref_model_name_or_path`, `ref_model_init_kwargs`, `ref_adapter_name_or_path`).
        ref_model (`PreTrainedModel`, *optional*):
            A reference object passed to the trainer. Released (the trainer drops it) after its last use.
    """

    def __init__(self, args, ref_model: torch.nn.Module | None = None):
        self.args = args
        self.ref_model = ref_model
        self._object_key: str | None = None
        self._object_dtype: str | None = None  # kept after the object is released, for keys and the report

    @property
    def configured(self) -> bool:
        return (
            self.ref_model is not None
            or self.args.ref_model_name_or_path is not None
            or self.args.ref_adapter_name_or_path is not None
        )

    def describe(self) -> dict[str, Any]:
        if self.ref_model is not None or self._object_key is not None:
            name = getattr(getattr(self.ref_model, "config", None), "_name_or_path", None)
            return {"kind": "model_object", "name": name}
        if self.args.ref_model_name_or_path is not None:
            return {"kind": "model_path", "name": self.args.ref_model_name_or_path}
        if self.args.ref_adapter_name_or_path is not None:
            return {"kind": "adapter", "name": self.args.ref_adapter_name_or_path}
        return {"kind": "none"}

    # ------------------------------------------------------------------------------------------------------------
    # Checks (before any forward; the trainer raises them on every process)
    # ------------------------------------------------------------------------------------------------------------

    def check_source(self, model) -> None:
        args = self.args
        if args.token_cleaning == "self_evolving":
            if self.ref_model is not None:
                raise ValueError(
                    "`token_cleaning='self_evolving'` uses the model itself, as it stands after each round, as the "
                    "reference; do not pass `ref_model=`. To clean against that model, use `token_cleaning='fixed'`."
                )
            return
        needs_reference = args.token_cleaning == "online" or args.token_selection in ("global", "sample", "batch")
        # A weight column needs no scoring, and a score column (`token_scores_from="column:<name>"`) is the score
        # itself: neither compares with a reference.
        needs_reference = needs_reference and getattr(args, "token_weights_column", None) is None
        needs_reference = needs_reference and not str(getattr(args, "token_scores_from", None)).startswith("column:")
        if needs_reference and not self.configured:
            raise ValueError(
                f"`token_cleaning={args.token_cleaning!r}` with `token_selection={args.token_selection!r}` ranks tokens "
                "by `L_base - L_ref` and needs a reference model. Pass `ref_model=` to the trainer, or set "
                "`ref_model_name_or_path` (a full model) or `ref_adapter_name_or_path` (a PEFT adapter) in the "
                "config. To train like SFTTrainer, set `token_cleaning='none'`."
            )
        if self.ref_model is not None and (args.ref_model_name_or_path or args.ref_adapter_name_or_path):
            raise ValueError(
                "A `ref_model` object was passed together with `ref_model_name_or_path` or `ref_adapter_name_or_path`; "
                "use only one reference."
            )
        if args.ref_adapter_name_or_path is not None:
            if not is_peft_model(model):
                raise ValueError(
                    "`ref_adapter_name_or_path` loads the reference as a second adapter on the trained model's base, "
                    "which needs PEFT training: pass `peft_config` (or a `PeftModel`). For full fine-tuning, merge "
                    "the adapter into its base and pass it as `ref_model_name_or_path`."
                )
            config_path = os.path.join(args.ref_adapter_name_or_path, "adapter_config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(
                    f"`ref_adapter_name_or_path={args.ref_adapter_name_or_path!r}` is not a PEFT adapter folder: "
                    f"{config_path} does not exist. Save the warm-up adapter with `model.save_pretrained(path)`."
                )

    def check_compatibility(self, model, tokenizer) -> None:
        """Refuse a reference that scores other token ids than the trained model, reading configs only."""
        vocab_size = config_vocab_size(unwrap_causal_lm(model))
        if self.ref_model is not None:
            raise_if_vocab_differs(
                config_vocab_size(unwrap_causal_lm(self.ref_model)), vocab_size, "the `ref_model` object"
            )
            return
        path = self.args.ref_model_name_or_path
        if path is None:
            return
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=self.args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot load the reference model config from `ref_model_name_or_path={path!r}`: {error}. Pass a "
                "local model folder (with config.json) or a Hub id reachable from this machine."
            ) from error
        raise_if_vocab_differs(config_vocab_size(config), vocab_size, f"`ref_model_name_or_path={path!r}`")
        if os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
        ):
            ref_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.args.trust_remote_code)
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"The tokenizer saved with `ref_model_name_or_path={path!r}` differs from the trained model's "
                    "tokenizer. Token scores compare the two models' losses on the same token ids, so the "
                    "reference must be trained from the same base with the same tokenizer."
                )

    # ------------------------------------------------------------------------------------------------------------
    # Identity (score cache keys) without loading when the source is a path
    # ------------------------------------------------------------------------------------------------------------

    def identity(self, base_key: str | None = None) -> str:
        """
        Cache key of the reference. A path is keyed by provenance (resolved path, file names, sizes and modification
        times, init kwargs), so a fully cached run never loads it; an adapter by the same plus the base it sits on; an
        object by the fingerprint of its (gathered) weights, taken once.
        """
        args = self.args
        if args.ref_adapter_name_or_path is not None:
            return sha256_json({"model": base_key, "adapter": file_provenance(args.ref_adapter_name_or_path)})
        if args.ref_model_name_or_path is not None:
            init = {k: str(v) for k, v in sorted((args.ref_model_init_kwargs or {}).items())}
            return sha256_json({"reference": file_provenance(args.ref_model_name_or_path), "init": init})
        if self._object_key is None:
            marker = {"whole_module": True} if is_peft_model(self.ref_model) else {"adapter": None}
            self._object_key = sha256_json({"model": fingerprint_module(self.ref_model), **marker})
        return self._object_key

    def weights_dtype(self, model_dtype: str) -> str:
        """
        The dtype the reference's weights score in: a `ref_model=` object's own, a path's `dtype` init kwarg (as given:
        `"auto"` is the checkpoint's), otherwise the trained model's (`model_dtype`), in which a path is loaded and on
        which an adapter sits.
        """
        if self.ref_model is not None:
            self._object_dtype = weights_dtype(self.ref_model)
        if self._object_dtype is not None:
            return self._object_dtype
        dtype = (self.args.ref_model_init_kwargs or {}).get("dtype")
        if self.args.ref_model_name_or_path is not None and dtype is not None:
            return str(dtype).replace("torch.", "")
        return model_dtype

    # ------------------------------------------------------------------------------------------------------------
    # Loading, preparation and release
    # ------------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def scoring(self, model, accelerator, dtype: torch.dtype) -> Iterator[tuple[torch.nn.Module, Any]]:
        """
        Yield `(module to call, forward context factory)` for the reference pass, and release what was loaded. The
        module is None for an adapter reference: the trained model, as prepared, runs with the adapter selected.

        `model` is the trained model as prepared (the adapter reference lives on it); `dtype` the dtype the trained
        model's weights were loaded in (a full reference is loaded in the same one unless its init kwargs say so).
        """
        if self.args.ref_adapter_name_or_path is not None:
            # The adapter lives on the trained model: the caller runs its own prepared module with it selected.
            with self._adapter_on_base(model) as context:
                yield None, context
            return
        if self.ref_model is not None:
            ref_model = prepare_reference(self.ref_model, accelerator)
        else:
            ref_model = prepare_reference(self._load(dtype, accelerator), accelerator)
        try:
            yield ref_model, contextlib.nullcontext
        finally:
            del ref_model

    def release(self) -> None:
        """Drop the reference object after its last use, so its memory is free for training."""
        self.ref_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, dtype: torch.dtype, accelerator) -> torch.nn.Module:
        from trl.trainer.utils import create_model_from_path

        path = self.args.ref_model_name_or_path
        kwargs = dict(self.args.ref_model_init_kwargs or {})
        kwargs.setdefault("dtype", dtype)
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        if accelerator.num_processes > 1 or accelerator.distributed_type in (
            DistributedType.DEEPSPEED,
            DistributedType.FSDP,
        ):
            # One copy per process, placed (or sharded) by `prepare_reference`; "auto" would spread every process's
            # copy over all the node's GPUs.
            kwargs["device_map"] = None
        with preserve_rng_state():
            ref_model = create_model_from_path(path, **kwargs)
        raise_if_vocab_differs(config_vocab_size(ref_model), None, f"`ref_model_name_or_path={path!r}`")
        return ref_model

    @contextlib.contextmanager
    def _adapter_on_base(self, model) -> Iterator[Any]:
        path = self.args.ref_adapter_name_or_path
        trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
        active_before = model.active_adapter

        def remove_reference_adapter():
            # Scores are final (or loading failed): drop the reference so it is neither trained, saved nor kept.
            model.set_adapter(active_before)
            if REF_ADAPTER_NAME in model.peft_config:
                model.delete_adapter(REF_ADAPTER_NAME)
            for name, param in model.named_parameters():
                param.requires_grad_(name in trainable_before)

        with preserve_rng_state():  # PEFT initialises the new layers randomly before loading the weights
            try:
                model.load_adapter(path, adapter_name=REF_ADAPTER_NAME, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as error:
                remove_reference_adapter()
                raise ValueError(
                    f"Cannot load `ref_adapter_name_or_path={path!r}` onto the trained model: {error}. The reference "
                    "adapter must have been trained on the same base model (same architecture and vocabulary)."
                ) from error
        try:
            yield lambda: adapter_for_scoring(model, REF_ADAPTER_NAME)
        finally:
            remove_reference_adapter()


@contextlib.contextmanager
def adapter_for_scoring(model, adapter_name: str | None) -> Iterator[None]:
    """
    TRL's `use_adapter` (the adapters off for `None`, else `adapter_name` active) for one no-grad scoring forward,
    with every parameter as trainable as before. PEFT marks the adapters it disables or deactivates as frozen, and
    FSDP2 fixes each unit's gradient dtype at its first forward from the parameters trainable then: a first forward
    with the trained LoRA frozen left its units without one, and under bf16 mixed precision the first backward then
    assigned bf16 gradients to the fp32 LoRA parameters (a RuntimeError in FSDP2's reduce-scatter).
    """
    trainable = {param: param.requires_grad for param in model.parameters()}
    with use_adapter(model, adapter_name):
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        yield


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether a model's parameters are FSDP2 `DTensor`s or ZeRO-3 partitions (the same on every process)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


class ScoringSides:
    """
    The three sides a token loss can be taken from, and the score-cache key of each: `"base"` (the original model: the
    model with its adapters off under PEFT, otherwise its weights before the first step), `"ref"` (the [`Reference`])
    and `"model"` (the trained model as it is now).

    Args:
        reference ([`Reference`]):
            The run's reference.
        models (`Callable[[], tuple[torch.nn.Module, torch.nn.Module]]`):
            `(model, module a forward calls)` as they stand now: the trainer's model and the DeepSpeed engine, the
            FSDP2 module or the plain model (accelerate replaces them when it prepares the model).
        accelerator (`accelerate.Accelerator`):
            Prepares a reference loaded from a path like the trained model.
        model_source (`str`, *optional*):
            The path or hub id the model was loaded from: it keys the cached base losses without a fingerprint.
        model_init_kwargs (`dict`, *optional*):
            The kwargs it was loaded with (part of that key).
    """

    def __init__(
        self, reference: Reference, models, accelerator, model_source=None, model_init_kwargs=None, collective=None
    ):
        self.reference = reference
        self.models = models
        self.accelerator = accelerator
        self.model_source = model_source
        self.model_init_kwargs = model_init_kwargs or {}
        self.collective = collective
        self._base_identity: Any = None

    def key(self, role: str) -> str:
        """
        Cache key of one side, taken on every process (fingerprints gather sharded weights together). The base and a
        reference given by path are keyed by provenance, so a fully cached run loads nothing.
        """
        model, _ = self.models()
        if role == "model":
            return self._with_precision(sha256_json({"model": fingerprint_module(model), "whole_module": True}), role)
        if self._base_identity is None:
            # Taken before the first step (the base is the model's initial weights, or its base under PEFT).
            if self.model_source is not None:
                init = {k: str(v) for k, v in sorted(self.model_init_kwargs.items())}
                self._base_identity = {"source": file_provenance(self.model_source), "init": init}
            elif is_peft_model(model):
                self._base_identity = self._fingerprint(model, lambda: base_weights_key(model))
            else:
                self._base_identity = self._fingerprint(model, lambda: fingerprint_module(model))
        if role == "base":
            side = sha256_json({"model": self._base_identity, "adapter": None})
        else:
            side = self.reference.identity(base_key=sha256_json(self._base_identity))
        return self._with_precision(side, role)

    def _fingerprint(self, model, fingerprint) -> str:
        """
        Sharded weights are fingerprinted by every process together (the gathers are collectives). Whole weights are
        fingerprinted on the main process and sent to the others: before accelerate prepares the model, their copies
        may still be on the meta device (`fsdp_cpu_ram_efficient_loading`), and a model on the meta device everywhere
        is refused with the reason (see `refuse_meta_tensors`).
        """
        if self.collective is None or _is_sharded(model):
            return fingerprint()
        return decide_on_main(self.collective, fingerprint)

    def _with_precision(self, side_key: str, role: str) -> str:
        # The same weights score differently in another dtype or autocast: never share cached losses across them.
        return sha256_json({"side": side_key, "precision": self.precision(role)})

    def precision(self, role: str) -> dict[str, str]:
        """The dtype of a side's weights and the autocast of its forwards (the run's mixed precision): part of its
        cache key and of the report."""
        model, _ = self.models()
        own = weights_dtype(model)
        weights = self.reference.weights_dtype(own) if role == "ref" else own
        return {"weights": weights, "autocast": scoring_mixed_precision(self.accelerator)}

    def describe_precision(self, reference_role: str | None, compute_dtypes: dict[str, str]) -> dict[str, Any]:
        """
        `report.json`'s `scoring_precision`: for the base side and the reference side (`reference_role`: `"ref"`, or
        `"model"` in self-evolving runs, None without a reference), the weights' dtype, the autocast, and the dtype
        the matmuls of their last forward ran in (when this process ran one; the LM head always projects in float32).
        """
        sides = {"base": "base", "reference": reference_role} if reference_role else {"base": "base"}
        out = {}
        for name, role in sides.items():
            out[name] = self.precision(role)
            if role in compute_dtypes:
                out[name]["compute"] = compute_dtypes[role]
        return out

    @contextlib.contextmanager
    def scoring(self, role: str) -> Iterator[tuple[torch.nn.Module, Any]]:
        """Yield `(module to call, forward context factory)` for one side; release what it loaded on exit."""
        model, prepared = self.models()
        if role == "model":
            yield prepared, contextlib.nullcontext
        elif role == "base":
            yield (
                prepared,
                (lambda: adapter_for_scoring(model, None)) if is_peft_model(model) else contextlib.nullcontext,
            )
        else:
            dtype = next(unwrap_causal_lm(model).parameters()).dtype
            with self.reference.scoring(model, self.accelerator, dtype) as (ref_model, context):
                yield (prepared if ref_model is None else ref_model), context
