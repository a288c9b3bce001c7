# The report's own pages (`snakemake --report report.html`): parameters, FLOPs per patch and size on disk of the
# teachers and every student, the Dice and speed tables of the evaluation, the soft-label cache's size and
# `fastkd cache verify` status, and nnU-Net's training curves of every fold. Layout: fastkd/report.py.

# LABEL, checkpoint of every fold: each teacher folder (the teachers first: the reference of the size ratios),
# then each student and baseline. Students declare only their final validation (written after the checkpoint).
REPORT_MODELS = [("teachers" if name == MAIN_TEACHERS else name, c) for name in TEACHER_SETS
                 for c in teacher_checkpoints(name)] + [
    (s.label, sp.student_checkpoint(s.r, fold, s.kd)) for s, sp, fold in STUDENT_FOLDS]
REPORT_ONNX = [(s.label, sp.student_onnx(s.r, fold, s.kd)) for s, sp, fold in STUDENT_FOLDS] if config["export"]["onnx"] else []


rule report_summary:
    input:
        teachers=[c for name in TEACHER_SETS for c in teacher_checkpoints(name)],
        students=[sp.student_validation_summary(s.r, fold, s.kd) for s, sp, fold in STUDENT_FOLDS],
        onnx=[path for _, path in REPORT_ONNX],
        evaluation=[P.evaluation_table(s, "json") for s in EVALUATION_SETS],
        caches=[P.softlabel_cache_root(name) for name in CACHES],
    output:
        models=report(P.report_table("models"), caption="../report/models.rst", category="Models"),
        models_png=report(P.report_table("models", "png"), caption="../report/models_figure.rst", category="Models"),
        models_tsv=P.report_table("models", "tsv"),
        dice=report(P.report_table("dice"), caption="../report/dice.rst", category="Evaluation"),
        speed=report(P.report_table("speed"), caption="../report/speed.rst", category="Evaluation"),
        speed_tsv=P.report_table("speed", "tsv"),
        cache=report(P.report_table("cache"), caption="../report/cache.rst", category="Soft-label cache"),
        cache_tsv=P.report_table("cache", "tsv"),
        curves=report(directory(P.report_curves), patterns=["{model}__fold_{fold}.png"],
                      caption="../report/curves.rst", category="Training curves", subcategory="{model}",
                      labels={"model": "{model}", "fold": "{fold}"}),
    params:
        models=" ".join(q(f"{label}={path}") for label, path in REPORT_MODELS),
        onnx=f"--onnx {' '.join(q(f'{label}={path}') for label, path in REPORT_ONNX)}" if REPORT_ONNX else "",
        evaluation=lambda w, input: f"--evaluation {input.evaluation}" if input.evaluation else "",
        stores=lambda w, input: " ".join(q(Path(root).parent) for root in input.caches),
        out=lambda w, output: q(Path(output.models).parent),
        title=q(P.dataset_name),
    log:
        P.log("report_summary"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        NNUNET_ENV
    shell:
        "fastkd report summary {params.models} {params.onnx} {params.evaluation} --cache {params.stores}"
        " -o {params.out} --title {params.title} > {log} 2>&1"
