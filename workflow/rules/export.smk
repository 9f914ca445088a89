# Export: GGUF files with llama.cpp's own converter and quantizer, each loaded back and checked.


rule quantize:
    """Convert to F16 GGUF with the training chat template embedded, quantize, load each file in llama.cpp; an Ollama Modelfile beside each."""
    input:
        model=tuned_source,
        eval=eval_texts_input,
    output:
        gguf=directory(f"{RESULTS}/{{recipe}}/{{variant}}/gguf"),
    params:
        code=stage_code("quantize"),
        section=stage_params("quantize", "pretrain", "format"),
    log:
        "logs/{recipe}/{variant}/quantize.log",
    benchmark:
        "benchmarks/{recipe}/{variant}/quantize.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../../scripts/quantize.py"
