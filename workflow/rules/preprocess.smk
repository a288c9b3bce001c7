# Raw data -> nnU-Net plans and preprocessed arrays (nnU-Net's own planner and preprocessor), or a
# dataset nnU-Net preprocessed already (plans.preprocess: false). Layout: fastkd/preprocess.py.

if P.is_demo:

    rule demo_data:
        output:
            dataset_json=P.raw_dataset_json,
            images=DEMO_FILES[0],
            labels=DEMO_FILES[1],
            test_images=DEMO_TEST_FILES[0],
            test_labels=DEMO_TEST_FILES[1],
        params:
            folder=lambda w, output: q(Path(output.dataset_json).parent),
            n_cases=config["dataset"]["demo"]["n_cases"],
            n_test=config["dataset"]["demo"]["n_test"],
            seed=config["dataset"]["demo"]["seed"],
            anisotropic="--anisotropic" if config["dataset"]["demo"]["anisotropic"] else "",
            # CT-scale options (dataset.demo.shape, spacing, n_structures, n_channels, regions) and label_noise
            options=demo_cli_options(config["dataset"]["demo"]),
        log:
            P.log("demo_data"),
        benchmark:
            P.benchmark("demo_data")
        threads: 1
        resources:
            mem_mb=demo_resources(config["dataset"]["demo"])["mem_mb"],  # 2000 MB, 10 min for the default demo
            runtime=demo_resources(config["dataset"]["demo"])["runtime"],
        conda:
            NNUNET_ENV
        shell:
            "fastkd demo write {params.folder} --n-cases {params.n_cases} --n-test {params.n_test} --seed {params.seed}"
            " {params.anisotropic} {params.options} > {log} 2>&1"


if P.is_demo and UNLABELLED:

    # dataset.demo.n_unlabelled: images without labels, written into the demo dataset by a job of their own
    # (another count reruns none of the labelled data's jobs); after demo_data, which replaces the folder.
    rule demo_unlabelled:
        input:
            dataset_json=P.raw_dataset_json,
        output:
            images=UNLABELLED_FILES,
        params:
            folder=lambda w, input: q(Path(input.dataset_json).parent),
            n_unlabelled=config["dataset"]["demo"]["n_unlabelled"],
            seed=config["dataset"]["demo"]["seed"],
            anisotropic="--anisotropic" if config["dataset"]["demo"]["anisotropic"] else "",
            options=demo_image_options(config["dataset"]["demo"]),
        log:
            P.log("demo_unlabelled"),
        threads: 1
        resources:
            mem_mb=demo_resources(config["dataset"]["demo"])["mem_mb"],
            runtime=demo_resources(config["dataset"]["demo"])["runtime"],
        conda:
            NNUNET_ENV
        shell:
            "fastkd demo unlabelled {params.folder} --n-unlabelled {params.n_unlabelled} --seed {params.seed}"
            " {params.anisotropic} {params.options} > {log} 2>&1"


if config["plans"]["preprocess"]:

    rule plan_preprocess:
        input:
            dataset_json=P.raw_dataset_json,
            teacher_plans=[] if TRAIN_TEACHERS else [P.teacher_plans],
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
            raw_source=lambda w, input: q(Path(input.dataset_json).parent),
            configurations=" ".join(config["plans"]["configurations"]),
            plans=lambda w, input: (
                f"--planner {P.planner_class}" if TRAIN_TEACHERS else f"--plans-from {q(Path(input.teacher_plans[0]).parent)}"
            ),
            gpu_memory=(
                f"--gpu-memory-target {config['plans']['gpu_memory_target_gb']}"
                if config["plans"]["gpu_memory_target_gb"]
                else ""
            ),
            num_processes=config["plans"]["num_processes"],
            # dataset.holdout: nnUNet_raw/<ds> holds the training cases only; another holdout reruns the job
            holdout=(
                f"--holdout {config['dataset']['holdout']['n_test']} --holdout-seed {config['dataset']['holdout']['seed']}"
                if HELD_OUT_CASES
                else ""
            ),
        log:
            P.log("plan_preprocess"),
        benchmark:
            P.benchmark("plan_preprocess")
        threads: rule_resources("plan_preprocess")["threads"]
        resources:
            mem_mb=rule_resources("plan_preprocess")["mem_mb"],
            runtime=rule_resources("plan_preprocess")["runtime"],
        conda:
            NNUNET_ENV
        shell:
            "fastkd preprocess run -d {params.dataset_id} --raw-source {params.raw_source}"
            " -c {params.configurations} --manifests {output.manifests} {params.plans} {params.gpu_memory}"
            " -np {params.num_processes} {params.holdout} > {log} 2>&1"

else:

    # nnUNetv2_plan_and_preprocess ran already: check every case is there, list them (nnU-Net's split
    # is written if missing, never replaced).
    rule adopt_preprocessed:
        input:
            dataset_json=P.raw_dataset_json,
            plans=P.plans_file,
        output:
            manifests=preprocess_targets(),
        params:
            dataset=P.dataset_name,
            plans=P.plans_name,
            configurations=" ".join(config["plans"]["configurations"]),
        log:
            P.log("adopt_preprocessed"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            NNUNET_ENV
        shell:
            "fastkd preprocess adopt -d {params.dataset} -p {params.plans} -c {params.configurations}"
            " --manifests {output.manifests} > {log} 2>&1"


if UNLABELLED:

    # dataset.unlabelled: checked and preprocessed with the teachers' plans (fastkd/unlabelled.py). Only the
    # manifest is the job's output: a case preprocessed already from the same files and plans is kept, so an
    # added image costs its own preprocessing and teacher forwards only.
    rule preprocess_unlabelled:
        input:
            images=UNLABELLED_FILES,
            plans=P.plans_file,
            manifest=P.preprocess_manifest(TEACHER_CFG),
            test_images=TEST_FILES[0],
        output:
            manifest=P.unlabelled_manifest(TEACHER_CFG),
        params:
            source=q(P.unlabelled_source),
            dataset=P.dataset_name,
            plans=P.plans_name,
            configuration=TEACHER_CFG,
            raw=q(P.raw_source),
            test_images=lambda w, input: f"--test-images {q(Path(input.test_images[0]).parent)}" if input.test_images else "",
        log:
            P.log("preprocess_unlabelled"),
        benchmark:
            P.benchmark("preprocess_unlabelled")
        threads: 1
        resources:
            mem_mb=rule_resources("plan_preprocess")["mem_mb"],
            runtime=rule_resources("plan_preprocess")["runtime"],
        conda:
            NNUNET_ENV
        shell:
            "fastkd preprocess unlabelled {params.source} -d {params.dataset} -p {params.plans} -c {params.configuration}"
            " --raw {params.raw} {params.test_images} --manifest {output.manifest} > {log} 2>&1"
