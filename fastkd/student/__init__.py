"""The student: plans derived from the teachers' (:mod:`.plans`), the KD loss (:mod:`.loss`), the
loader that reads cached soft labels at nnU-Net's patch boxes (:mod:`.loader`) and the nnU-Net
trainer subclass that puts them together (:mod:`.trainer`)."""


def trainer_name(kd: bool, da5: bool = False) -> str:
    """Name of the student trainer class, and so of its nnU-Net model folder ``<name>__<plans>__<cfg>``.

    ``kd=False`` is the no-KD baseline (alpha = 0). Kept here, free of torch imports, because the
    Snakefile computes every student path at parse time.
    """
    return "nnUNetTrainerFastKD" + ("" if kd else "NoKD") + ("_DA5" if da5 else "")
