"""Using a model with its adapters: loading them, generating and chatting (generate.py), labelling or answering
many texts (predict.py), scoring (scoring.py).

Inference never imports training: a caller that wants the training loss in a score passes it in.
"""
