"""Entry for the prepare_model rule: a base model as a local safetensors folder, made once."""
from tunesmith import models
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    spec = io.params["model"]
    info = models.prepare(spec["source"], io.output["model"],
                          revision=spec.get("revision"), max_length=spec["max_length"],
                          trust_remote_code=spec["trust_remote_code"], offline=io.params["offline"])
    print(f"prepared {spec['source']} -> {info['path']} in {info['seconds']:.1f} s")


if __name__ == "__main__":
    run(main, "prepare_model")
