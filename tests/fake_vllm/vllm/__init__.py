"""A stand-in for vLLM 0.33.0 with its signatures (LLM, LLM.generate, SamplingParams,
RequestOutput / CompletionOutput): records what it is given and returns deterministic outputs,
ending token_ids with the stop token as vLLM does (stop_reason None for the tokenizer's EOS,
the token id for a stop_token_ids stop)."""

import json
import os
import time

RECORD_DIR = os.environ["FAKE_VLLM_RECORD"]
EOS = 2  # the toy tokenizer's
ENGINE_ARGS = {"max_model_len"}  # what LLM(**kwargs) may pass on to EngineArgs here


class SamplingParams:
    def __init__(
        self,
        *,
        n=1,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        seed=None,
        stop=None,
        stop_token_ids=None,
        ignore_eos=False,
        max_tokens=16,
        min_tokens=0,
        logprobs=None,
        skip_special_tokens=True,
        include_stop_str_in_output=False,
        detokenize=True,
    ):
        if temperature == 0 and n > 1:
            raise ValueError("n must be 1 when using greedy sampling")
        if top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}")
        self.kwargs = {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_tokens": max_tokens,
            "seed": seed,
            "stop_token_ids": stop_token_ids,
        }


class CompletionOutput:
    def __init__(
        self, index, text, token_ids, cumulative_logprob=None, logprobs=None, finish_reason=None, stop_reason=None
    ):
        self.index, self.text, self.token_ids = index, text, token_ids
        self.cumulative_logprob, self.logprobs, self.finish_reason, self.stop_reason = (
            cumulative_logprob,
            logprobs,
            finish_reason,
            stop_reason,
        )


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, outputs, finished=True):
        self.request_id, self.prompt, self.prompt_token_ids, self.outputs, self.finished = (
            request_id,
            prompt,
            prompt_token_ids,
            outputs,
            finished,
        )


class LLM:
    def __init__(
        self,
        model,
        *,
        tensor_parallel_size=1,
        dtype="auto",
        seed=0,
        gpu_memory_utilization=0.92,
        enforce_eager=False,
        **kwargs,
    ):
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if os.environ.get("FAKE_VLLM_FAIL_SEED") == str(seed) or os.environ.get("FAKE_VLLM_FAIL_GPU") == os.environ.get(
            "CUDA_VISIBLE_DEVICES"
        ):
            raise RuntimeError("CUDA out of memory (stand-in failure)")
        self.kwargs = {
            "model": model,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            **kwargs,
        }
        self.calls = 0

    def generate(
        self,
        prompts,
        sampling_params=None,
        *,
        use_tqdm=True,
        lora_request=None,
        priority=None,
        tokenization_kwargs=None,
        mm_processor_kwargs=None,
    ):
        # as vLLM: one SamplingParams for every prompt, or a list with one per prompt
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.calls += 1
        if os.environ.get("FAKE_VLLM_DIE_AT_CALL") == str(self.calls):  # a kill in the middle of the work
            os._exit(137)
        time.sleep(float(os.environ.get("FAKE_VLLM_SECONDS_PER_CALL", "0")))  # a generate call that takes time
        env = {
            k: os.environ.get(k)
            for k in (
                "CUDA_VISIBLE_DEVICES",
                "RANK",
                "WORLD_SIZE",
                "MASTER_ADDR",
                "LOCAL_RANK",
                "TORCHELASTIC_RUN_ID",
                "VLLM_PORT",
                "PYTORCH_CUDA_ALLOC_CONF",
                "VLLM_CACHE_ROOT",
                "TORCHINDUCTOR_CACHE_DIR",
                "FAKE_VLLM_INTERPRETER",
            )
        }
        with open(
            os.path.join(RECORD_DIR, f"gpu{env['CUDA_VISIBLE_DEVICES']}.jsonl"), "a"
        ) as f:  # one line per generate call
            f.write(
                json.dumps(
                    {
                        "llm": self.kwargs,
                        "sampling": [p.kwargs for p in params],
                        "prompts": prompts,
                        "env": env,
                        "use_tqdm": use_tqdm,
                    }
                )
                + "\n"
            )
        outputs = []
        for k, (prompt, p) in enumerate(zip(prompts, params)):
            ids = prompt["prompt_token_ids"]
            completions = []
            for j in range(p.kwargs["n"]):
                token = 10 + (sum(ids) + j) % 7
                if j % 3 == 0:  # stopped by the tokenizer's EOS
                    completions.append(
                        CompletionOutput(j, f"t{token}", [token, EOS], finish_reason="stop", stop_reason=None)
                    )
                elif j % 3 == 1:  # stopped by a stop_token_ids token
                    stop = p.kwargs["stop_token_ids"][0]
                    completions.append(
                        CompletionOutput(j, f"t{token}", [token, stop], finish_reason="stop", stop_reason=stop)
                    )
                else:
                    completions.append(
                        CompletionOutput(j, f"t{token}", [token] * p.kwargs["max_tokens"], finish_reason="length")
                    )
            outputs.append(RequestOutput(str(k), None, ids, completions))
        if os.environ.get("FAKE_VLLM_DROP"):
            outputs = outputs[:-1]
        return outputs
