# fastkd: distil an nnU-Net v2 ensemble into one small student. This file is the table of contents;
# every rule lives in workflow/rules/<stage>.smk and calls one `fastkd <stage> <action>` command.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Every wildcard, constrained once: reduction factor, fold, soft-label shard, teacher folder, model folder,
# evaluation case set, soft-label cache, student model folder.
wildcard_constraints:
    r=r"\d+",
    fold=r"[0-4]|all",
    shard=r"\d+|unlabelled-\d+",
    teacher="|".join(re.escape(name) for name in TEACHER_SETS),
    model=r"[^/]+__[^/]+__[^/]+",
    case_set=r"test|fold_[0-4]_validation",
    cache="|".join(re.escape(name) for name in CACHES) or "$^",  # soft-label caches (none: nothing matches)
    student="|".join(re.escape(name) for name in STUDENTS),


include: "workflow/rules/preprocess.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/softlabels.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
        rules.report_summary.output,
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


rule export:
    input:
        export_targets(),


rule evaluation:
    input:
        evaluation_targets(),


rule summary:
    input:
        rules.report_summary.output,
