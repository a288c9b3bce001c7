# Evaluation: the teacher ensemble (as nnU-Net predicts by default), each student fold and its no-KD
# baseline predict the same labelled cases with `fastkd predict`; nnU-Net's evaluation scores them into
# one Dice table per case set (the test set, or each student fold's validation cases, marked optimistic).
# Layout: fastkd/evaluate.py.


# The cases of a validation set (from nnU-Net's split), or of the test set dataset.holdout holds back (linked
# from the raw dataset where it really lives: nnUNet_raw/<ds> lacks them).
rule evaluation_cases:
    wildcard_constraints:
        case_set=r"fold_[0-4]_validation" + ("|test" if HELD_OUT_CASES else ""),
    input:
        splits=lambda w: [] if w.case_set == TEST_SET else [P.splits_file],
        dataset_json=P.raw_dataset_json,
    output:
        images=directory(P.evaluation_images("{case_set}")),
        labels=directory(P.evaluation_labels("{case_set}")),
    params:
        # the held-out cases themselves: another pick reruns the job and every prediction of them
        cases=lambda w, input: (
            "--cases " + " ".join(q(c) for c in HELD_OUT_CASES)
            if w.case_set == TEST_SET
            else f"--splits {q(input.splits[0])} -f {set_fold(w.case_set)}"
        ),
        raw=lambda w, input: q(Path(input.dataset_json).parent),
    log:
        P.log("evaluation_cases", "{case_set}"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        NNUNET_ENV
    shell:
        "fastkd evaluate cases {params.cases} --raw {params.raw} --images {output.images} --labels {output.labels}"
        " > {log} 2>&1"


rule predict_teachers:
    input:
        images=lambda w: evaluation_inputs(w.case_set)[0],
        checkpoints=teacher_checkpoints(MAIN_TEACHERS),
        manifest=P.teacher_manifest_of(MAIN_TEACHERS),  # reruns when a checkpoint's content changes
    output:
        predictions=directory(P.predictions("{case_set}", "teachers")),
    params:
        images=lambda w: q(P.evaluation_images(w.case_set)),
        folder=lambda w, input: q(Path(input.checkpoints[0]).parents[1]),
        folds=" ".join(str(f) for f in config["teachers"]["folds"]),
        checkpoint=config["teachers"]["checkpoint"],
        step_size=EVALUATION["step_size"],
        device=EVALUATION["device"],
    log:
        P.log("predict_teachers", "{case_set}"),
    benchmark:
        P.benchmark("predict_teachers", "{case_set}")
    threads: rule_resources("predict")["threads"]
    resources:
        mem_mb=rule_resources("predict")["mem_mb"],
        runtime=rule_resources("predict")["runtime"],
        gpu=device_gpus(EVALUATION["device"]),
    conda:
        NNUNET_ENV
    shell:
        "fastkd predict -i {params.images} -o {output.predictions} -m {params.folder} -f {params.folds}"
        " -chk {params.checkpoint} --step-size {params.step_size} --device {params.device}"
        " --threads {threads} > {log} 2>&1"


rule predict_student:
    input:
        images=lambda w: evaluation_inputs(w.case_set)[0],
        validation=lambda w: validation_summary(P.model_folder(w.model), w.fold),
    output:
        predictions=directory(P.predictions("{case_set}", "{model}__fold_{fold}")),
    params:
        images=lambda w: q(P.evaluation_images(w.case_set)),
        folder=lambda w: q(P.model_folder(w.model)),
        mirroring="" if EVALUATION["mirroring"] else "--disable-mirroring",
        step_size=EVALUATION["step_size"],
        device=EVALUATION["device"],
    log:
        P.log("predict_student", "{case_set}__{model}__fold_{fold}"),
    benchmark:
        P.benchmark("predict_student", "{case_set}__{model}__fold_{fold}")
    threads: rule_resources("predict")["threads"]
    resources:
        mem_mb=rule_resources("predict")["mem_mb"],
        runtime=rule_resources("predict")["runtime"],
        gpu=device_gpus(EVALUATION["device"]),
    conda:
        NNUNET_ENV
    shell:
        "fastkd predict -i {params.images} -o {output.predictions} -m {params.folder} -f {wildcards.fold}"
        " {params.mirroring} --step-size {params.step_size} --device {params.device}"
        " --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        predictions=lambda w: [P.predictions(w.case_set, label) for label in evaluation_models(w.case_set)],
        labels=lambda w: evaluation_inputs(w.case_set)[1],
    output:
        tsv=P.evaluation_table("{case_set}", "tsv"),
        json=P.evaluation_table("{case_set}", "json"),
        md=P.evaluation_table("{case_set}", "md"),
        png=report(P.evaluation_table("{case_set}", "png"), caption="../report/evaluation.rst", category="Evaluation"),
    params:
        labels=lambda w: q(P.evaluation_labels(w.case_set)),
        dataset_json=lambda w: q(P.raw_dataset_json),
        out=lambda w: q(P.evaluation(w.case_set)),
        optimistic=lambda w: "--optimistic" if is_optimistic(w.case_set) else "",
    log:
        P.log("evaluate", "{case_set}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        NNUNET_ENV
    shell:
        "fastkd evaluate table {input.predictions} -l {params.labels} --dataset-json {params.dataset_json}"
        " -o {params.out} --case-set {wildcards.case_set} {params.optimistic} > {log} 2>&1"
