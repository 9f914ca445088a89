"""prepare_model: a base model as a local safetensors folder, made once."""
from tunesmith import models, settings
from tunesmith.stage import run


def main(io):
    return models.prepare_stage(io.params["model"], io.output["model"], offline=settings.offline())


if __name__ == "__main__":
    run(main)
