"""cards: a model card for the adapter, the merged model and the GGUF files, with lineage, scores and contamination."""
from tunesmith.stage import run


def main(io):
    from tunesmith import publish

    return publish.local_cards(recipe=io.recipe, variant=io.variant or "main", section=io.section.get("publish") or {},
                               folders={"adapter": io.input["adapter"], "merged": io.input["merged"],
                                        "gguf": io.one("gguf") or ""},
                               compare=io.one("compare"), dataset_source=io.params.get("dataset_source"),
                               out_dir=io.output["cards"])


if __name__ == "__main__":
    run(main)
