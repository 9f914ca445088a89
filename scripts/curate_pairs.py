"""curate_pairs: canonical preference pairs, curated, with a report and a token histogram."""
from tunesmith.stage import run


def main(io):
    from tunesmith.data.pairs import curate_stage

    # preference.source as written when it is a hub id (only a local file is an input of the rule)
    source = io.one("pairs") or io.section["preference"]["source"]
    return curate_stage(source, io.input["tokenizer"], io.input["template"], io.section, io.output["pairs"],
                        io.output["report"], io.output["hist"])


if __name__ == "__main__":
    run(main)
