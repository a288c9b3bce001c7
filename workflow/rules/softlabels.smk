# Soft-label cache: every teacher fold runs once per case (nnU-Net's sliding window), the tempered
# fold-averaged probabilities go to one Zarr store. Cases are split into shards, one job each (each
# loads the teachers once); each case is written atomically, and the store's root is written last by
# softlabels_finalize, once every case is in. Unlabelled images (dataset.unlabelled) have shards of their own,
# unlabelled-<i>, in the same store. One cache per temperature and soft-label fold selection (a
# sweep has several; the wildcard {cache} is its name, CACHES in common.smk). Layout: fastkd/cache/layout.py.


rule softlabels_shard:
    input:
        teachers=teacher_targets(),
        manifest=shard_manifest,  # the training cases', or the unlabelled images' (shards unlabelled-<i>)
        cases=shard_inputs,
        # out_of_fold: nnU-Net's split says which fold held each case out
        splits=lambda w: [P.splits_file] if one(CACHES[w.cache].config, "softlabels.folds_per_case") == "out_of_fold" else [],
    output:
        marker=P.softlabel_shard("{shard}", "{cache}"),
    params:
        store=lambda w: q(P.softlabel_cache(w.cache)),
        weights=" ".join(str(s["weight"]) for s in TEACHER_SETS.values()),
        temperature=lambda w: one(CACHES[w.cache].config, "distillation.temperature"),
        folds_per_case=lambda w, input: (f"--folds-per-case out_of_fold --splits {q(input.splits[0])}" if input.splits
                                         else "--folds-per-case all"),
        step=config["softlabels"]["step_size"],
        mirroring="" if config["softlabels"]["mirroring"] else "--disable-mirroring",
        dtype=config["softlabels"]["dtype"],
        top_k=f"--top-k {config['softlabels']['top_k']}" if config["softlabels"]["top_k"] else "",
        device=config["softlabels"]["device"],
        shard=lambda w: f"{shard_of(w)[1] + 1}/{shard_of(w)[2]}",
    log:
        P.log("softlabels_shard", "{cache}__{shard}"),
    benchmark:
        P.benchmark("softlabels_shard", "{cache}__{shard}")
    threads: rule_resources("softlabels")["threads"]
    resources:
        mem_mb=softlabels_mem_mb,
        runtime=rule_resources("softlabels")["runtime"],
        gpu=device_gpus(config["softlabels"]["device"]),
    conda:
        SOFTLABELS_ENV
    shell:
        "fastkd softlabels fill -o {params.store} -t {input.teachers} -w {params.weights} -m {input.manifest}"
        " -T {params.temperature} {params.folds_per_case} --step-size {params.step} {params.mirroring} --dtype {params.dtype} {params.top_k}"
        " --shard {params.shard} --device {params.device} --threads {threads}"
        " --marker {output.marker} > {log} 2>&1"


rule softlabels_finalize:
    input:
        shards=[P.softlabel_shard(i, "{cache}") for i in SHARDS],
        manifest=P.preprocess_manifest(TEACHER_CFG),
        unlabelled=[P.unlabelled_manifest(TEACHER_CFG)] if UNLABELLED else [],
    output:
        root=P.softlabel_cache_root("{cache}"),
    params:
        store=lambda w, output: q(Path(output.root).parent),
    log:
        P.log("softlabels_finalize", "{cache}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        SOFTLABELS_ENV
    shell:
        "fastkd softlabels finalize {params.store} -m {input.manifest} {input.unlabelled} > {log} 2>&1"


rule softlabels_preview:
    input:
        root=P.softlabel_cache_root("{cache}"),
    output:
        png=report(P.softlabel_preview("{cache}"), caption="../report/softlabels.rst", category="Soft-label cache"),
    params:
        store=lambda w, input: q(Path(input.root).parent),
        case=CASES[0],
    log:
        P.log("softlabels_preview", "{cache}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        SOFTLABELS_ENV
    shell:
        "fastkd cache show {params.store} {params.case} -o {output.png} > {log} 2>&1"
