"""The built-in example: synthetic support tickets for ten queues, generated deterministically.

Labels are sparse, Zendesk-like group ids. The wording varies (greetings,
context, several phrasings per problem, product names, order numbers), some
problems sit between two queues, and a few tickets are routed "wrongly", as
in real helpdesk data, so that a model cannot reach 100%.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# queue id -> (queue name, problem phrasings). Slots in braces are filled at random.
QUEUES: dict[int, tuple[str, list[str]]] = {
    360001583912: (
        "billing",
        [
            "i was charged twice for my {plan} subscription this month",
            "there is a charge of {amount} dollars on my card that i do not recognise",
            "my invoice {invoice} shows the wrong amount",
            "why did my bill go up to {amount} dollars",
            "can you send me a copy of invoice {invoice} for my accountant",
            "the vat number on my invoice is missing",
            "my payment of {amount} dollars was taken but the invoice still says unpaid",
            "please update the billing address on my account",
            "i need a receipt for the {plan} plan payment",
            "the card on file expired how do i change the payment method",
        ],
    ),
    360001583927: (
        "refunds",
        [
            "i would like a refund for order {order}",
            "i returned the {product} two weeks ago and still have no refund",
            "when will i get my money back for order {order}",
            "please refund the {amount} dollars you charged by mistake",
            "the refund for order {order} went to an old card",
            "i cancelled within the trial but was charged {amount} dollars please refund",
            "how long does a refund take to show on my statement",
            "my refund was only partial i expected {amount} dollars",
        ],
    ),
    4402038847251: (
        "shipping",
        [
            "my order {order} has not arrived yet",
            "the tracking for order {order} has not updated in {days} days",
            "the courier says delivered but i never got the {product}",
            "can i change the delivery address for order {order}",
            "do you ship the {product} to {country}",
            "my package is stuck in customs in {country}",
            "order {order} arrived with the box crushed and the {product} damaged",
            "how much is express shipping to {country}",
        ],
    ),
    4402038851003: (
        "returns",
        [
            "how do i return the {product} i bought last week",
            "i want to exchange the {product} for a different size",
            "can i get a return label for order {order}",
            "the {product} does not fit can i send it back",
            "is the return window {days} days or thirty days",
            "i sent the {product} back but the return is not showing",
            "the {product} is faulty and i want to swap it for a new one",
        ],
    ),
    360002114870: (
        "account access",
        [
            "i cannot log in to my account",
            "the password reset email never arrives",
            "my account is locked after too many attempts",
            "the two factor code is not accepted on my new phone",
            "i changed my email address and now cannot sign in",
            "the login page keeps saying invalid password but it is correct",
            "i lost my phone with the authenticator app how do i get in",
            "how do i change the email address i use to sign in",
        ],
    ),
    360002114891: (
        "technical issue",
        [
            "the {app} app crashes every time i open it",
            "the {app} app is very slow since the last update",
            "i get error {code} when i try to save my work",
            "the page shows a blank screen in {browser}",
            "sync between the {app} app and the website is not working",
            "notifications stopped working on my phone",
            "the export to pdf button does nothing in {browser}",
            "uploading a file fails with error {code}",
        ],
    ),
    16066574298652: (
        "subscriptions",
        [
            "please cancel my {plan} subscription",
            "how do i downgrade from {plan} to the basic plan",
            "i want to upgrade to the {plan} plan for my team",
            "can i pause my subscription for {days} days",
            "stop the automatic renewal of my {plan} plan",
            "what happens to my data if i cancel my subscription",
            "i want to add five more seats to our {plan} plan",
        ],
    ),
    16066574312207: (
        "privacy",
        [
            "please delete my account and all my personal data",
            "i want a copy of all the data you hold about me under gdpr",
            "who do you share my personal data with",
            "unsubscribe me from all marketing emails",
            "i think someone else used my account without permission",
            "please correct my name and date of birth in your records",
            "how long do you keep my data after i close my account",
        ],
    ),
    900004417718: (
        "api and integrations",
        [
            "the api returns error {code} for every request",
            "our webhook stopped receiving events yesterday",
            "what is the rate limit of the api for the {plan} plan",
            "the {integration} integration does not sync new contacts",
            "how do i generate a new api key",
            "the api documentation for the orders endpoint is out of date",
            "oauth login for the {integration} integration fails with error {code}",
        ],
    ),
    900004417905: (
        "sales",
        [
            "we are a team of {seats} people can we get a quote",
            "do you offer a discount for nonprofits",
            "i would like a demo of the {plan} plan for my company",
            "can we pay by bank transfer for an annual contract",
            "what is the price for {seats} seats on the {plan} plan",
            "do you have an enterprise plan with single sign on",
            "can i talk to someone about a volume discount",
        ],
    ),
}

SLOTS = {
    "plan": ["pro", "premium", "team", "business", "starter", "family"],
    "amount": ["9.99", "19", "49", "120", "15.50", "299", "7"],
    "invoice": ["inv 20431", "number 88412", "inv 55120", "0098123"],
    "order": ["12345", "number 88231", "a77120", "4410092", "30021"],
    "product": ["headphones", "jacket", "charger", "backpack", "shoes", "lamp", "keyboard"],
    "days": ["three", "five", "ten", "14", "seven"],
    "country": ["canada", "germany", "australia", "japan", "brazil", "ireland"],
    "app": ["ios", "android", "desktop", "mac", "windows"],
    "code": ["500", "403", "e1042", "429", "401", "timeout 504"],
    "browser": ["chrome", "firefox", "safari", "edge"],
    "integration": ["salesforce", "slack", "hubspot", "shopify", "zapier"],
    "seats": ["20", "50", "120", "35", "300"],
}
OPENINGS = [
    "",
    "",
    "hi",
    "hello",
    "hi there",
    "good morning",
    "hello support team",
    "hey",
    "dear support",
]
CONTEXT = [
    "",
    "",
    "",
    "i have been a customer for years.",
    "this is the second time i am writing about this.",
    "i tried the help center already.",
    "this is urgent.",
    "my colleague had the same problem last month.",
    "i am writing from my work account.",
    "sorry if this is the wrong place to ask.",
]
CLOSINGS = [
    "",
    "",
    "thanks",
    "thank you",
    "please help",
    "thanks in advance",
    "regards",
    "can you help?",
    "let me know asap!",
    "cheers",
]
MISROUTED_SHARE = 0.03


def generate(rows_per_queue: int, seed: int) -> list[dict[str, object]]:
    """Tickets for every queue, shuffled; the same arguments give the same rows."""
    rng = random.Random(seed)
    labels = list(QUEUES)
    rows = []
    for label, (_, phrasings) in QUEUES.items():
        for _ in range(rows_per_queue):
            routed = label
            if rng.random() < MISROUTED_SHARE:
                routed = rng.choice([other for other in labels if other != label])
            rows.append({"label": routed, "text": _ticket(rng, phrasings)})
    rng.shuffle(rows)
    return rows


def _ticket(rng: random.Random, phrasings: list[str]) -> str:
    problem = rng.choice(phrasings)
    problem = problem.format(**{k: rng.choice(v) for k, v in SLOTS.items()})
    ending = (
        "?"
        if problem.startswith(("how", "can", "do ", "what", "is ", "when", "why", "who"))
        else "."
    )
    parts = [rng.choice(OPENINGS), rng.choice(CONTEXT), problem + ending, rng.choice(CLOSINGS)]
    if rng.random() < 0.3:  # some people lead with the context
        parts[1], parts[2] = parts[2], parts[1]
    return " ".join(p for p in parts if p)


def write_example(folder: Path, train_per_queue: int = 80, test_per_queue: int = 30) -> Path:
    """Write folder/train/data.json and folder/test/data.json; return `folder`."""
    splits = {"train": generate(train_per_queue, seed=1), "test": generate(test_per_queue, seed=2)}
    for name, rows in splits.items():
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (target / "data.json").write_text(lines, encoding="utf-8")
    return folder
