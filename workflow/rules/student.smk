# Students: plans derived from the teachers' (features per stage / r), then one nnU-Net training job
# per student (reduction factor x the swept T, alpha, soft-label fold selection and seed; the wildcard
# {student} is its model folder name, STUDENTS in common.smk) and fold on patches plus cached soft labels,
# and (student.baseline) the same student trained without KD, per r and seed. Each result is a stock
# nnU-Net model folder; layout: fastkd/student/run.py.


rule student_plans:
    input:
        manifest=P.preprocess_manifest(TEACHER_CFG),
        base_plans=P.student_base_plans_file,
    output:
        plans=P.student_plans_file("{r}"),
    params:
        strategy=f"-bs {P.student_block_strategy}" if P.student_block_strategy else "",
    log:
        P.log("student_plans", "r{r}"),
    threads: rule_resources("student_plans")["threads"]
    resources:
        mem_mb=rule_resources("student_plans")["mem_mb"],
        runtime=rule_resources("student_plans")["runtime"],
    conda:
        NNUNET_ENV
    shell:
        "fastkd student plans {input.base_plans} -r {wildcards.r} {params.strategy} -o {output.plans} > {log} 2>&1"


# Parameters and FLOPs per patch, teacher vs student (built by nnU-Net on PyTorch's meta device).
rule student_info:
    input:
        teacher_plans=P.plans_file,
        student_plans=P.student_plans_file("{r}"),
    output:
        info=P.student_info("{r}"),
    params:
        configuration=TEACHER_CFG,
    log:
        P.log("student_info", "r{r}"),
    threads: 1
    resources:
        mem_mb=rule_resources("student_plans")["mem_mb"],
        runtime=rule_resources("student_plans")["runtime"],
    conda:
        NNUNET_ENV
    shell:
        "fastkd student info {input.teacher_plans} --student {input.student_plans} -c {params.configuration}"
        " -o {output.info} > {log} 2>&1"


rule train_student:
    wildcard_constraints:
        student="|".join(re.escape(name) for name in students_of(kd=True)) or "$^",
    input:
        TRAINING_DATA,
        plans=lambda w: STUDENTS[w.student][1].student_plans_file(STUDENTS[w.student][0].r),
        cache=lambda w: P.softlabel_cache_root(student_cache(w.student)),
    # nnU-Net's final validation, written after checkpoint_final.pth. The checkpoints are no outputs:
    # Snakemake deletes a job's outputs before it reruns it, and a student's checkpoints are only ever
    # continued or moved aside by the trainer (fastkd/student/run.py).
    output:
        validation=validation_summary(P.model_folder("{student}"), "{fold}"),
    params:
        dataset_id=P.dataset_id,
        plans=lambda w, input: Path(input.plans).stem,
        configuration=TEACHER_CFG,
        softlabels=lambda w, input: f"--cache {q(Path(input.cache).parent)}",
        settings=lambda w: student_settings_args(w.student),
    log:
        P.log("train_student", "{student}_fold_{fold}"),
    benchmark:
        P.benchmark("train_student", "{student}_fold_{fold}")
    threads: rule_resources("train_student")["threads"]
    resources:
        mem_mb=rule_resources("train_student")["mem_mb"],
        runtime=rule_resources("train_student")["runtime"],
        gpu=device_gpus(STUDENT["device"], STUDENT["num_gpus"]),
    conda:
        NNUNET_ENV
    shell:
        "fastkd student train -d {params.dataset_id} -p {params.plans} -c {params.configuration} -f {wildcards.fold}"
        " {params.softlabels} --threads {threads} --set {params.settings} > {log} 2>&1"


# The no-KD baseline: same student plans, schedule and checkpointing, alpha = 0 (no cache needed).
use rule train_student as train_baseline with:
    wildcard_constraints:
        student="|".join(re.escape(name) for name in students_of(kd=False)) or "$^",
    input:
        TRAINING_DATA,
        plans=lambda w: STUDENTS[w.student][1].student_plans_file(STUDENTS[w.student][0].r),
    params:
        dataset_id=P.dataset_id,
        plans=lambda w, input: Path(input.plans).stem,
        configuration=TEACHER_CFG,
        softlabels="--baseline",
        settings=lambda w: student_settings_args(w.student),
    log:
        P.log("train_baseline", "{student}_fold_{fold}"),
    benchmark:
        P.benchmark("train_baseline", "{student}_fold_{fold}")


# Per r: training curves and the final validation Dice of the teachers (folds trained here), the
# distilled students and the baselines, side by side, for the Snakemake report.
rule student_report:
    input:
        student_report_inputs,
    output:
        png=report(P.student_report("{r}"), caption="../report/student.rst", category="Students"),
        tsv=P.student_report("{r}", "tsv"),
    params:
        models=student_report_models,
        title=lambda w: q(f"{P.dataset_name}: students r = {w.r}"),
    log:
        P.log("student_report", "r{r}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        REPORT_ENV
    shell:
        "fastkd student report {params.models} -o {output.png} --tsv {output.tsv} --title {params.title} > {log} 2>&1"
