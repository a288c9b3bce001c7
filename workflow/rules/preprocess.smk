# Raw data -> nnU-Net plans and preprocessed arrays (nnU-Net's own planner and preprocessor).

if P.is_demo:

    rule demo_data:
        output:
            dataset_json=P.raw_dataset_json,
            images=[P.raw_dataset / "imagesTr" / f"{c}_0000.nii.gz" for c in CASES],
            labels=[P.raw_dataset / "labelsTr" / f"{c}.nii.gz" for c in CASES],
        params:
            folder=q(P.raw_dataset),
            n_cases=config["dataset"]["demo"]["n_cases"],
            seed=config["dataset"]["demo"]["seed"],
            anisotropic="--anisotropic" if config["dataset"]["demo"]["anisotropic"] else "",
        log:
            P.log("demo_data"),
        benchmark:
            P.benchmark("demo_data")
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        shell:
            "fastkd demo-data {params.folder} --n-cases {params.n_cases} --seed {params.seed}"
            " {params.anisotropic} > {log} 2>&1"


rule plan_preprocess:
    input:
        dataset_json=P.raw_dataset_json,
        teacher_plans=[] if TRAIN_TEACHERS else [P.teacher_folder / "plans.json"],
    output:
        plans=P.plans_file,
        splits=P.splits_file,
        arrays=[
            P.preprocessed_case(cfg, case, seg)
            for cfg in config["plans"]["configurations"]
            for case in CASES
            for seg in (False, True)
        ],
        manifests=preprocess_targets(),
    params:
        dataset_id=P.dataset_id,
        raw_source=q(P.raw_source),
        configurations=" ".join(config["plans"]["configurations"]),
        plans=(
            f"--planner {P.planner_class}" if TRAIN_TEACHERS else f"--plans-from {q(P.teacher_folder)}"
        ),
        gpu_memory=(
            f"--gpu-memory-target {config['plans']['gpu_memory_target_gb']}"
            if config["plans"]["gpu_memory_target_gb"]
            else ""
        ),
        num_processes=config["plans"]["num_processes"],
    log:
        P.log("plan_preprocess"),
    benchmark:
        P.benchmark("plan_preprocess")
    threads: rule_resources("plan_preprocess")["threads"]
    resources:
        mem_mb=rule_resources("plan_preprocess")["mem_mb"],
        runtime=rule_resources("plan_preprocess")["runtime"],
    shell:
        "fastkd plan-preprocess -d {params.dataset_id} --raw-source {params.raw_source}"
        " -c {params.configurations} --manifests {output.manifests} {params.plans} {params.gpu_memory}"
        " -np {params.num_processes} > {log} 2>&1"
