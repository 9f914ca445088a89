"""GGUF export with llama.cpp's own converter and quantizer on a random Llama whose rows are
multiples of 256: every file loads in llama.cpp, generates through its embedded chat template,
tokenises like HF, and (F16) reproduces the HF logits; the in-process lm-eval class over
llama.cpp generates what HF generates. ~1.5 min on 2 busy cores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunesmith import llamacpp, quantization
from tunesmith.errors import EnvironmentNotSupported, TunesmithError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama256_dir, eval_split):
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    report = quantization.export(llama256_dir, out, types=["Q8_0", "Q4_K_M"], smoke_prompt="Say hello.",
                             eval_jsonl=eval_split["eval"], n_texts=6, max_tokens=64, pre_tokenizer_fallback="gpt-2",
                             system="You reverse word lists.", name="tiny")
    return out, report


@pytest.mark.slow
def test_every_file_loads_generates_and_tokenises_like_hf(exported):
    out, report = exported
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    files = report["files"]
    assert list(files) == ["F16", "Q8_0", "Q4_K_M"]
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model-Q4_K_M.gguf", "model-Q8_0.gguf", "model-f16.gguf"]
    for name, info in files.items():
        assert info["size_bytes"] == (out / info["file"]).stat().st_size
        assert info["tokenization_agreement"] == 1.0, (name, info["tokenization_first_mismatch"])
        assert info["chat_template_embedded"] and info["chat_template_matches_training"], name
        assert info["smoke"]["chat_format"] == "chat_template.default", name  # the GGUF's own template
        assert info["smoke"]["tokens"] > 0, name
        assert 0 <= info["top1_agreement"] <= 1 and info["mean_kl"] >= 0
    assert files["F16"]["size_bytes"] > files["Q8_0"]["size_bytes"] > files["Q4_K_M"]["size_bytes"]
    # F16 is the HF model up to rounding: same argmax everywhere, KL ~ 0.
    assert files["F16"]["top1_agreement"] >= 0.99 and files["F16"]["mean_kl"] < 1e-4
    assert files["Q8_0"]["mean_kl"] < files["Q4_K_M"]["mean_kl"]
    # rows of 256: every matrix really is K-quantized, and the report says so
    assert files["Q4_K_M"]["k_quant_fallback"]["count"] == 0
    assert set(files["Q4_K_M"]["tensor_types"]) <= {"F32", "Q4_K", "Q6_K"}
    assert (out / "smoke.txt").read_text().count("== ") == 3
    for name, info in files.items():  # what the quantize run records: path, size and sha256 of each file
        assert info["sha256"] == quantize_sha256(out / info["file"]), name


def quantize_sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_an_ollama_modelfile_beside_each_gguf(exported, llama256_dir):
    out, report = exported
    for info in report["files"].values():
        text = (out / info["modelfile"]).read_text()
        lines = text.splitlines()
        assert f"FROM ./{info['file']}" in lines
        # SmolLM2's end of turn; no TEMPLATE: Ollama takes the one embedded in the GGUF
        assert 'PARAMETER stop "<|im_end|>"' in lines and not any(x.startswith("TEMPLATE") for x in lines)
        assert 'SYSTEM """You reverse word lists."""' in lines
        assert lines[0].startswith(f"# ollama create tiny -f {info['modelfile']}")
    custom = quantization.modelfile("model-Q8_0.gguf", stops=["<|im_end|>"], system=None, template="{{ .Prompt }}", name="x")
    assert 'TEMPLATE """{{ .Prompt }}"""' in custom.splitlines() and "SYSTEM" not in custom
    with pytest.raises(TunesmithError, match="three double quotes"):
        quantization.modelfile("m.gguf", stops=[], system='say """hi"""', template=None, name="x")


@pytest.mark.slow
def test_k_quant_fallback_is_reported_for_rows_not_multiple_of_256(tmp_path, tiny_llama_dir):
    f16 = tmp_path / "f16.gguf"
    quantization.convert(tiny_llama_dir, f16)  # hidden 64: no row is a multiple of 256
    quantization.quantize_file(f16, tmp_path / "q4km.gguf", "Q4_K_M")
    info = quantization.tensor_types(tmp_path / "q4km.gguf", "Q4_K_M")["k_quant_fallback"]
    assert info["count"] > 0 and not any(t["row_multiple_of_256"] for t in info["tensors"])
    assert set(info["types"]) <= {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "F16"}


@pytest.mark.slow
def test_llama_cpp_lm_matches_hf_greedy_generation_and_loglikelihood(exported, llama256_dir):
    """The in-process lm-eval model over F16 reproduces HF: same greedy text, same log-likelihood."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.gguf_lm import LlamaCppLM

    out, _ = exported
    tok = AutoTokenizer.from_pretrained(llama256_dir)
    model = AutoModelForCausalLM.from_pretrained(llama256_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Reverse: a b c"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    hf_text = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                         skip_special_tokens=False)
    context = "Reverse the words: a b c. Answer:"
    with torch.no_grad():
        whole, n = tok(context + " tiger ocean").input_ids, len(tok(context).input_ids)
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        hf_ll = float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole))))

    class Req:  # the shape of lm-eval's Instance that the LM methods read
        def __init__(self, *args):
            self.args = args

    lm = LlamaCppLM(out / "model-f16.gguf", n_ctx=512)
    try:
        [text] = lm.generate_until([Req(prompt, {"until": ["<|im_end|>"], "max_gen_toks": 12})])
        [(ll, _)] = lm.loglikelihood([Req(context, " tiger ocean")])
    finally:
        lm.close()
    assert text == hf_text.split("<|im_end|>")[0]
    assert np.isclose(ll, hf_ll, atol=0.01 * abs(hf_ll) + 0.02), (ll, hf_ll)


def test_unknown_type_and_missing_converter_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(TunesmithError, match="unknown llama.cpp type 'Q4_K_Z'.*Q4_K_M"):
        quantization.ftype_of("Q4_K_Z")
    monkeypatch.setenv(llamacpp.ENV_LLAMA_CPP_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(EnvironmentNotSupported, match="tools/setup_env.sh"):
        llamacpp.llama_cpp_dir()
