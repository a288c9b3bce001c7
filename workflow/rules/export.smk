# Deployable students: each trained fold (KD student and baseline) exported to ONNX, its preprocessing in
# the file's metadata, verified against PyTorch with onnxruntime before it is kept; with
# export.tensorrt.enabled, a TensorRT engine of each export, checked against onnxruntime. Layout:
# fastkd/export/onnx.py, fastkd/export/tensorrt.py.


rule export_onnx:
    input:
        validation=lambda w: validation_summary(P.model_folder(w.model), w.fold),
    output:
        onnx=P.onnx_export("{model}", "{fold}"),
        verification=P.onnx_verification("{model}", "{fold}"),
    params:
        folder=lambda w: q(P.model_folder(w.model)),
        # an engine is built from a TensorRT-friendly export (constant folding, onnxslim's simplified graph)
        # with a dynamic batch: engines batch up to export.tensorrt.max_batch tiles
        options=" ".join(flag for flag, on in (("--dynamic", config["export"]["dynamic"]),
                                                ("--batch 0", config["export"]["tensorrt"]["enabled"]
                                                 and not config["export"]["dynamic"]),
                                                ("--simplify", config["export"]["simplify"]),
                                                ("--tensorrt", config["export"]["tensorrt"]["enabled"])) if on),
    log:
        P.log("export_onnx", "{model}_fold_{fold}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        EXPORT_ENV
    shell:
        "fastkd export onnx {params.folder} -f {wildcards.fold} -o {output.onnx} {params.options} > {log} 2>&1"


rule export_trt:
    input:
        onnx=P.onnx_export("{model}", "{fold}"),
        verification=P.onnx_verification("{model}", "{fold}"),
    output:
        engine=P.trt_engine("{model}", "{fold}"),
        metadata=P.trt_metadata("{model}", "{fold}"),
    params:
        precision=config["export"]["tensorrt"]["precision"],
        max_batch=config["export"]["tensorrt"]["max_batch"],
        workspace_gb=config["export"]["tensorrt"]["workspace_gb"],
        # int8 calibrates on the training cases, preprocessed on the teachers' grid (the students' too)
        calibration=(
            f"--calibration {q(P.preprocessed_dataset / P.data_identifier(TEACHER_CFG))}"
            if config["export"]["tensorrt"]["precision"] == "int8"
            else ""
        ),
    log:
        P.log("export_trt", "{model}_fold_{fold}"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=device_gpus("cuda"),  # TensorRT builds for, and runs on, an NVIDIA GPU
    conda:
        TENSORRT_ENV
    shell:
        "fastkd export trt {input.onnx} -o {output.engine} --precision {params.precision} --max-batch {params.max_batch}"
        " --workspace-gb {params.workspace_gb} {params.calibration} > {log} 2>&1"
