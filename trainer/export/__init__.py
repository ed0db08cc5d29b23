"""`./launch.sh export`: a checkpoint -> a consolidated model folder (+ MLflow Model Registry).

export (the command), zero_files (reading and checking DeepSpeed's ZeRO partition files),
pyfunc (the MLflow pyfunc signature and input checks) and pyfunc_model (the pyfunc's code).
"""
