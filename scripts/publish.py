"""publish (opt-in): the adapter, merged model and GGUFs to Hugging Face Hub repositories with model cards."""
from tunesmith.stage import run


def main(io):
    from tunesmith import publish, settings

    return publish.stage(recipe=io.recipe, variant=io.variant or "main", section=io.section,
                         folders={"adapter": io.input["adapter"], "merged": io.input["merged"], "gguf": io.one("gguf") or ""},
                         compare=io.one("compare"), dataset_source=io.params.get("dataset_source"),
                         plan_path=io.output["plan"], offline=settings.offline())


if __name__ == "__main__":
    run(main)
