"""Config overrides of sweeps (several values of distillation settings), for the sweep tests and their dry runs."""


SWEEP = {"distillation": {"temperature": [1, 3], "alpha": [0.3, 0.7], "reduction_factors": [4]},
         "softlabels": {"folds_per_case": ["all", "out_of_fold"]}, "student": {"seeds": [0, 1]},
         "export": {"onnx": False}}



FORMS = {"distillation": {"temperature": 1, "alpha": [0.5, 1.0], "loss": ["additive", "convex"], "scales": ["full", "all"],
                          "class_balanced": [False, True]}, "export": {"onnx": False},
         "student": {"seeds": [0]}}
