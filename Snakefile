# fastkd: distil an nnU-Net v2 ensemble into one small student. This file is the table of contents;
# every rule lives in workflow/rules/<stage>.smk and calls a `fastkd` subcommand.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/softlabels.smk"
include: "workflow/rules/student.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# Named targets: `snakemake --cores N <name>` runs the workflow up to that stage.
rule preprocessed:
    input:
        preprocess_targets(),


rule teachers:
    input:
        teacher_targets(),


rule softlabels:
    input:
        softlabel_targets(),


rule student:
    input:
        student_targets(),
