"""register: log both final models under the pipeline's MLflow parent run and register them, the IET
model as tracking.registry_name and the baseline as <registry_name>-baseline, each with the alias
tracking.alias pointing at the new version; write what was registered (--out)."""
import os

import click

from pipeline.compare import model_registry

from pipeline.core import store
from pipeline.core.config import load_params
from pipeline.core.io import chosen_weights, read_json, write_json
from pipeline.evaluate.metric_names import MODEL_TAGS, shown_in
from pipeline.core.store import tracking_uri
from pipeline.track.tracking import Tracker
from stages import pair_option, params_option, path_option, stage

MODELS = {"iet": "", "baseline": "-baseline"}  # model -> suffix of its registered name
HEADLINE = [m.key for m in shown_in(MODEL_TAGS)]  # metrics the registered versions carry as tags


@click.command()
@params_option
@pair_option("--model", "model_dirs", help="raw averaged weights")
@pair_option("--model-ema", "model_ema_dirs", help="EMA weights")
@pair_option("--metrics", "metrics_paths", help="evaluate's metrics.json")
@path_option("--out", help="what was registered (.json)")
@stage
def main(params_path, model_dirs, model_ema_dirs, metrics_paths, out):
    p = load_params(params_path)
    store.fail_fast_http()
    uri = tracking_uri(p.tracking)
    try:
        store.check_store(uri, must_exist=False)
        # the weights that were evaluated, so the registered model is the one whose metrics it carries
        dirs = {m: model_registry.find_pipeline_dir(chosen_weights(model_dirs[m], model_ema_dirs[m], p.eval.weights))
                for m in MODELS}
        metrics = {m: read_json(metrics_paths[m]) for m in MODELS}
        tracker = Tracker(p)
        names = {m: p.tracking.registry_name + suffix for m, suffix in MODELS.items()}
        model_registry.claim_names(tracker.client, list(names.values()))
        commit = tracker.client.get_run(tracker.parent_id).data.tags.get("git_commit", "unknown")
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        result = {}
        for m, name in names.items():
            tags = {"model": m, "weights": p.eval.weights, "git_commit": commit, **({"dvc_exp_name": exp_name} if exp_name else {}),
                    **{k: metrics[m][k] for k in HEADLINE if k in metrics[m]}}
            origin = f"git commit {commit[:12]}" + (f", DVC experiment {exp_name}" if exp_name else "")
            result[m] = model_registry.register(tracker.client, tracker.parent_id, dirs[m], name, p.tracking.alias,
                                          label=m, tags=tags, description=f"{m} model, {origin}")
    except store.StoreError as err:  # FetchError and NameTaken are ones
        raise click.ClickException(str(err)) from None
    write_json(out, {**result, "tracking_uri": uri})
    tracker.log_artifact(tracker.parent_id, out)
    for m, r in result.items():
        mem = metrics[m].get("mem_ratio")
        click.echo(f"{m}: {r['alias_uri']} -> version {r['version']}"
                   + (f" (memorization ratio {mem:.3f})" if isinstance(mem, (int, float)) else ""))


if __name__ == "__main__":
    main()
