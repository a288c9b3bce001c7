# Students: plans derived from the teachers' (features per stage / r), then one nnU-Net training job
# per reduction factor and fold on patches plus cached soft labels, and (student.baseline) the same
# student trained without KD. Each result is a stock nnU-Net model folder; layout: fastkd/student/train.py.


rule student_plans:
    input:
        manifest=P.preprocess_manifest(TEACHER_CFG),
    output:
        plans=P.student_plans_file("{r}"),
    wildcard_constraints:
        r=r"\d+",
    params:
        teacher_plans=q(P.plans_file),
        strategy=f"-bs {P.student_block_strategy}" if P.student_block_strategy else "",
    log:
        P.log("student_plans", "r{r}"),
    threads: rule_resources("student_plans")["threads"]
    resources:
        mem_mb=rule_resources("student_plans")["mem_mb"],
        runtime=rule_resources("student_plans")["runtime"],
    shell:
        "(fastkd student plans {params.teacher_plans} -r {wildcards.r} {params.strategy} -o {output.plans}"
        " && fastkd student info {params.teacher_plans} --student {output.plans} -c " + TEACHER_CFG + ") > {log} 2>&1"


rule train_student:
    input:
        plans=P.student_plans_file("{r}"),
        cache=P.softlabel_cache_root,
        splits=P.splits_file,
    output:
        checkpoint=P.student_checkpoint("{r}", "{fold}", kd=True),
        validation=P.student_validation_summary("{r}", "{fold}", kd=True),
    wildcard_constraints:
        r=r"\d+",
        fold="[0-4]|all",
    params:
        args=lambda w: student_args(w.r, kd=True),
    log:
        P.log("train_student", "r{r}_fold_{fold}"),
    benchmark:
        P.benchmark("train_student", "r{r}_fold_{fold}")
    threads: rule_resources("train_student")["threads"]
    resources:
        mem_mb=rule_resources("train_student")["mem_mb"],
        runtime=rule_resources("train_student")["runtime"],
        gpu=STUDENT_GPUS,
    shell:
        "fastkd train-student {params.args} -f {wildcards.fold} --threads {threads} > {log} 2>&1"


# The no-KD baseline: same student plans, schedule and checkpointing, alpha = 0 (no cache needed).
rule train_baseline:
    input:
        plans=P.student_plans_file("{r}"),
        splits=P.splits_file,
    output:
        checkpoint=P.student_checkpoint("{r}", "{fold}", kd=False),
        validation=P.student_validation_summary("{r}", "{fold}", kd=False),
    wildcard_constraints:
        r=r"\d+",
        fold="[0-4]|all",
    params:
        args=lambda w: student_args(w.r, kd=False),
    log:
        P.log("train_baseline", "r{r}_fold_{fold}"),
    benchmark:
        P.benchmark("train_baseline", "r{r}_fold_{fold}")
    threads: rule_resources("train_student")["threads"]
    resources:
        mem_mb=rule_resources("train_student")["mem_mb"],
        runtime=rule_resources("train_student")["runtime"],
        gpu=STUDENT_GPUS,
    shell:
        "fastkd train-student {params.args} -f {wildcards.fold} --threads {threads} > {log} 2>&1"


# Per r: training curves and the final validation Dice of the teachers (folds trained here), the
# distilled students and the baselines, side by side, for the Snakemake report.
rule student_report:
    input:
        students=lambda w: [P.student_validation_summary(w.r, f, kd) for f in STUDENT["folds"] for kd in P.student_kinds],
        teachers=[P.teacher_validation_summary(f) for f in STUDENT["folds"] if TRAIN_TEACHERS and f in config["teachers"]["folds"]],
    output:
        png=report(P.student_report("{r}"), caption="../report/student.rst", category="Students"),
        tsv=P.student_report("{r}", "tsv"),
    wildcard_constraints:
        r=r"\d+",
    params:
        models=lambda w: " ".join(q(m) for m in student_report_models(w.r)),
        title=lambda w: q(f"{P.dataset_name}: students r = {w.r}"),
    log:
        P.log("student_report", "r{r}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "fastkd student report {params.models} -o {output.png} --tsv {output.tsv} --title {params.title} > {log} 2>&1"
