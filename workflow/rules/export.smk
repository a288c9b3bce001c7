# Deployable students: each trained fold (KD student and baseline) exported to ONNX, its preprocessing in
# the file's metadata, verified against PyTorch with onnxruntime before it is kept. Layout:
# fastkd/export/onnx.py.


rule export_onnx:
    input:
        validation=lambda w: P.model_folder(w.model) / f"fold_{w.fold}" / "validation" / "summary.json",
    output:
        onnx=P.onnx_export("{model}", "{fold}"),
        verification=f"{P.onnx_export('{model}', '{fold}')}.json",
    params:
        folder=lambda w: q(P.model_folder(w.model)),
        options=" ".join(flag for flag, on in (("--dynamic", config["export"]["dynamic"]),
                                                ("--simplify", config["export"]["simplify"])) if on),
    log:
        P.log("export_onnx", "{model}_fold_{fold}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        NNUNET_ENV
    shell:
        "fastkd export onnx {params.folder} -f {wildcards.fold} -o {output.onnx} {params.options} > {log} 2>&1"
