"""Entry for the merge rule: adapter + 16-bit base -> merged bf16 model, logit check, samples, card."""
from pathlib import Path

from tunesmith import settings, tracking
from tunesmith.stage import StageIO, run


def main(io: StageIO) -> None:
    from tunesmith.merging import merge

    section = io.params["section"]
    recipe = io.params["recipe"]
    data_dir = Path(settings.results_dir()) / recipe / "data"
    with tracking.stage_run("merge", io.params, io.input, io.output, recipe=recipe,
                            variant=io.params.get("variant"), results_dir=settings.results_dir(),
                            section=section) as rec:
        check = merge(trained=io.input["model"], base=io.input["base"], template=io.input["template"],
                      merged=io.output["merged"], samples_path=io.output["samples"], check_path=io.output["check"],
                      section=section, eval_path=io.input.get("eval"), recipe=recipe,
                      card=io.params.get("card") or {}, train_metrics_path=io.input.get("metrics"),
                      data_dir=data_dir, record=rec)
    print(f"merged ({check['method']}): max logit diff {check['max_abs_logit_diff']:.3g}, held-out exact match "
          f"tuned {check['heldout_exact_match_tuned']}/{check['heldout_rows']} "
          f"vs base {check['heldout_exact_match_base']}/{check['heldout_rows']}")


if __name__ == "__main__":
    run(main, "merge")
