# Teacher ensemble: nnU-Net folds trained here (or an existing model folder), then its manifest.
# Layout: fastkd/teachers.py.

if TRAIN_TEACHERS:

    rule train_teacher:
        input:
            TRAINING_DATA,
        output:
            checkpoint=P.teacher_checkpoint("{fold}"),
            validation=P.teacher_validation_summary("{fold}"),
        params:
            dataset_id=P.dataset_id,
            configuration=TEACHER_CFG,
            plans=P.plans_name,
            trainer=config["teachers"]["trainer"],
            device=config["teachers"]["device"],
            schedule=config["teachers"]["schedule"],
            mirroring="" if config["teachers"]["validation_mirroring"] else "--disable-validation-mirroring",
            batch_size=(
                f"--batch-size {config['teachers']['schedule']['batch_size']}"
                if config["teachers"]["schedule"]["batch_size"]
                else ""
            ),
        log:
            P.log("train_teacher", "fold_{fold}"),
        benchmark:
            P.benchmark("train_teacher", "fold_{fold}")
        threads: rule_resources("train_teacher")["threads"]
        resources:
            mem_mb=rule_resources("train_teacher")["mem_mb"],
            runtime=rule_resources("train_teacher")["runtime"],
            gpu=device_gpus(config["teachers"]["device"]),
        conda:
            NNUNET_ENV
        shell:
            "fastkd teachers train -d {params.dataset_id} -c {params.configuration} -f {wildcards.fold}"
            " -p {params.plans} -tr {params.trainer} --device {params.device}"
            " --epochs {params.schedule[epochs]} --iterations {params.schedule[iterations_per_epoch]}"
            " --val-iterations {params.schedule[val_iterations_per_epoch]} {params.batch_size}"
            " --save-every {params.schedule[save_every]} {params.mirroring} --threads {threads} > {log} 2>&1"


# One manifest per teacher folder of the ensemble (the teachers, then teachers.extra): the folder
# checked and every checkpoint hashed. The soft-label jobs and the teachers' predictions depend on these
# manifests, so a changed checkpoint reruns them, also one copied in with an older modification time.
rule teacher_manifest:
    input:
        checkpoints=lambda w: teacher_checkpoints(w.teacher),
    output:
        manifest=P.teacher_manifest_of("{teacher}"),
    params:
        stamps=lambda w: file_stamps(teacher_checkpoints(w.teacher)),
        folder=lambda w: q(TEACHER_SETS[w.teacher]["folder"]),
        configuration=lambda w: TEACHER_SETS[w.teacher]["configuration"],
        folds=lambda w: " ".join(map(str, TEACHER_SETS[w.teacher]["folds"])),
        checkpoint=lambda w: TEACHER_SETS[w.teacher]["checkpoint"],
    log:
        P.log("teacher_manifest", "{teacher}"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        NNUNET_ENV
    shell:
        "fastkd teachers manifest {params.folder} -c {params.configuration} -f {params.folds}"
        " -chk {params.checkpoint} -o {output.manifest} > {log} 2>&1"
