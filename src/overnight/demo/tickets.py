"""Synthetic support tickets for the demo: a week of tickets, classified for a weekly report.

The tickets are meant to look like a real inbox rather than a textbook data set: several
products and channels, one-liners next to long emails, greetings and signatures, typos,
shouting, order numbers, URLs, stack-trace fragments, and tickets whose main topic is mixed
with a side remark about another one. Vocabulary overlaps between classes on purpose (a
broken checkout page is a bug, a feature request can sound like a complaint), so matching
label descriptions gets about half right while a head fitted on labelled examples does
far better. Everything is drawn from one seeded random.Random: same seed, same tickets.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

# Label -> description, written the way a user would in a job file; used for zero-shot.
CATEGORIES: dict[str, str] = {
    "billing": "Billing: charges, invoices, refunds, payments, pricing and subscription fees",
    "bug": "Bug report: something in the product is broken, crashes, shows an error "
    "or does not work as expected",
    "feature request": "Feature request: the customer asks for a new feature, an "
    "improvement or an integration",
    "account": "Account: login, password, two-factor authentication, email change, "
    "team members, permissions or deleting the account",
    "other": "Other: anything else, e.g. partnerships, press, feedback, spam, general questions",
}

# Uneven mix, as in a real support queue.
_CATEGORY_WEIGHTS = {
    "bug": 0.30,
    "billing": 0.25,
    "account": 0.20,
    "feature request": 0.15,
    "other": 0.10,
}
# Monday..Sunday: the queue fills after the weekend and is quiet on Saturday and Sunday.
_DAY_WEIGHTS = [1.35, 1.2, 1.1, 1.05, 0.95, 0.35, 0.3]
# Hours 0..23: business hours dominate, with a long evening tail.
_HOUR_WEIGHTS = [1, 1, 1, 1, 1, 2, 3, 6, 10, 12, 12, 11, 9, 10, 11, 11, 10, 8, 6, 5, 4, 3, 2, 1]

_PRODUCTS = ["Ledgerly", "Ledgerly Mobile", "ShipTrack", "Pulse Analytics", "Nimbus Drive"]
_PRODUCT_WEIGHTS = [0.3, 0.15, 0.2, 0.2, 0.15]
_CHANNELS = ["email", "chat", "web form", "phone transcript"]
_CHANNEL_WEIGHTS = [0.4, 0.3, 0.2, 0.1]

_FIRST = [
    "Anna",
    "James",
    "Priya",
    "Tom",
    "Sofia",
    "Mehmet",
    "Lena",
    "Carlos",
    "Yuki",
    "Fatima",
    "Olga",
    "Ben",
    "Chloe",
    "Raj",
    "Marta",
    "Kwame",
    "Ines",
    "Pavel",
    "Hannah",
    "Diego",
    "Aisha",
    "Lukas",
    "Grace",
    "Omar",
    "Nora",
    "Kenji",
    "Julia",
    "Sam",
    "Elif",
    "Marco",
]
_LAST = [
    "Smith",
    "Okafor",
    "Novak",
    "Garcia",
    "Chen",
    "Muller",
    "Rossi",
    "Kowalski",
    "Tanaka",
    "Haddad",
    "Silva",
    "Jensen",
    "Brown",
    "Dubois",
    "Ivanova",
    "Patel",
    "Larsen",
    "Moreau",
    "Schmidt",
    "Nakamura",
    "Costa",
    "Wright",
    "Yilmaz",
    "Berg",
]
_COMPANY_A = [
    "Blue",
    "Fern",
    "Northwind",
    "Copperleaf",
    "Atlas",
    "Brightside",
    "Harbor",
    "Kestrel",
    "Maple",
    "Orbit",
    "Quarry",
    "Redwood",
    "Summit",
    "Tidal",
    "Vantage",
    "Willow",
    "Zephyr",
    "Granite",
    "Lumen",
]
_COMPANY_B = [
    "Logistics",
    "Studio",
    "GmbH",
    "Ltd",
    "& Co",
    "Foods",
    "Dental",
    "Consulting",
    "Labs",
    "Retail",
    "Bakery",
    "Freight",
]

# Slot values filled into the templates below.
_FEATURES = [
    "the dashboard",
    "reports",
    "the invoice editor",
    "CSV export",
    "the mobile app",
    "search",
    "the calendar view",
    "shipment tracking",
    "file sharing",
    "the API",
    "notifications",
    "the settings page",
]
_INTEGRATIONS = [
    "Xero",
    "QuickBooks",
    "Slack",
    "Shopify",
    "Google Sheets",
    "Zapier",
    "Salesforce",
    "Teams",
    "HubSpot",
]
_PLANS = ["Starter", "Team", "Business", "Pro", "annual", "monthly"]
_BROWSERS = ["Chrome", "Safari", "Firefox", "Edge", "the iOS app", "the Android app"]
_VERSIONS = ["4.2.0", "4.2.1", "4.3", "5.0.2", "5.1", "2.18.7"]
_ERRORS = [
    "Error 500",
    "Something went wrong",
    "ERR_CONNECTION_RESET",
    "TypeError: Cannot read properties of undefined (reading 'id')",
    "502 Bad Gateway",
    "Request failed with status code 403",
    "NullPointerException",
    "ValueError: invalid literal for int()",
]
_PATHS = [
    "app/invoices",
    "app/reports/weekly",
    "settings/billing",
    "app/shipments",
    "login",
    "files",
]
_STACK = [
    'Traceback (most recent call last):\n  File "sync.py", line 214, in push\n'
    "    resp.raise_for_status()\nHTTPError: 500 Server Error",
    "at InvoiceForm.render (main.3f9a2c.js:1:48211)\nat commitRoot (vendor.js:2:99812)",
    "java.lang.IllegalStateException: cursor closed\n"
    "    at com.ledgerly.sync.Worker.run(Worker.java:88)",
    "Uncaught (in promise) TypeError: r.items is undefined   bundle.js:2:1337",
]
_EMOJI = [" 🙏", " 😡", " 🙂", " 😅", " 👍", " 🤷", " 😭", " !!"]

# Per category: intents, each (subjects, core sentences, detail sentences). Templates use
# {slots}; the overlaps between categories are deliberate (see the module docstring).
_Intent = tuple[list[str], list[str], list[str]]
_INTENTS: dict[str, list[_Intent]] = {
    "billing": [
        (
            ["Nonprofit discount?", "Quote needed", "Cost for more users"],
            [
                "Do you offer a discount for nonprofits or schools?",
                "Our procurement team needs a formal quote for {n} users before we can sign.",
                "How much would it cost to add {n} more people to our team?",
            ],
            [
                "We're a small charity.",
                "Budget approval is next week.",
            ],
        ),
        (
            ["Charged twice", "double charge on my card", "Duplicate payment {order}"],
            [
                "I was charged twice for the {plan} plan this month, {amount} both times.",
                "my card shows two payments of {amount} on the same day for {product}",
                "You billed us {amount} twice. Please fix this and refund one of them.",
            ],
            [
                "The second charge came through on {day}.",
                "Our accountant spotted it when reconciling the card statement.",
                "I only have one workspace so I don't understand how this happened.",
            ],
        ),
        (
            ["Refund request", "refund please", "Need my money back", "Refund for order {order}"],
            [
                "I'd like a refund for order {order}, we cancelled within the trial period.",
                "Please refund the last payment of {amount}, we stopped using {product} a month "
                "ago.",
                "We upgraded to {plan} by mistake, can you refund the difference?",
            ],
            [
                "Nobody on the team has logged in since we cancelled.",
                "Happy to send a screenshot of the bank statement if needed.",
                "It was an accident, someone clicked the upgrade button.",
            ],
        ),
        (
            ["Invoice is wrong", "VAT number missing on invoice", "Invoice {invoice} incorrect"],
            [
                "Invoice {invoice} has our old company address on it, can you reissue it?",
                "the VAT number is missing on our invoices so finance can't book them",
                "Our invoice shows {n} seats but the quote said fewer, please correct it.",
            ],
            [
                "We need the corrected invoice before month end.",
                "The company name should be {company}.",
                "Can you send a credit note for the old one?",
            ],
        ),
        (
            ["Payment failed", "card declined", "Can't renew subscription"],
            [
                "My card keeps getting declined when I try to renew, the bank says it's fine.",
                "payment failed for the {plan} plan and now we're getting warning emails",
                "The renewal didn't go through and I don't know why, the card is valid.",
            ],
            [
                "I tried two different cards.",
                "The bank confirmed there is no block on their side.",
                "Please don't suspend us, we're in the middle of month end.",
            ],
        ),
        (
            ["Price increase?", "why is my bill higher", "Unexpected charge"],
            [
                "Why did our bill go from {amount} to more this month? Nobody told us about a "
                "price change.",
                "We got charged {amount} which is more than we agreed, what changed?",
                "what is this charge of {amount} on our card from {product}??",
            ],
            [
                "We didn't add any users.",
                "I checked the pricing page and it still shows the old price.",
                "If prices went up we should have been told in advance.",
            ],
        ),
        (
            ["Receipts", "Where do I find receipts", "Invoice copies for tax"],
            [
                "Where can I download receipts for the last year? Our accountant needs them.",
                "can you send me copies of all invoices from {month} for our tax return",
                "I need a receipt for payment {order} with our company details on it.",
            ],
            [
                "The billing page only shows the last three months.",
                "PDF is fine.",
                "Please send to {email}.",
            ],
        ),
        (
            ["Switch to invoice payment", "Pay by bank transfer", "change payment method"],
            [
                "How do we switch from card payments to paying by bank transfer?",
                "Our card expires next week, how do I update the payment method?",
                "Can we pay yearly by invoice instead of monthly by card?",
            ],
            [
                "Our finance team prefers wire transfers.",
                "We're on the {plan} plan.",
                "Please let me know before the next charge on {day}.",
            ],
        ),
        (
            ["Cancel subscription", "stop charging me", "Cancel and no more charges"],
            [
                "Please cancel our subscription and make sure we are not charged again.",
                "I cancelled last month but you charged me {amount} again.",
                "we want to downgrade to the free plan before the next billing date",
            ],
            [
                "We are moving to another tool.",
                "Keep the data for now, just stop the payments.",
                "Confirm by email please.",
            ],
        ),
        (
            ["Charged for removed users", "Seat count wrong on bill"],
            [
                "We were billed for {n} seats but we removed three users last month.",
                "The bill still counts people who left the company, please adjust the charge.",
            ],
            [
                "Their accounts are deactivated already.",
                "We expect a prorated credit.",
            ],
        ),
    ],
    "bug": [
        (
            ["Recurring invoices not sent", "Invoice numbering wrong", "Reminders sent twice"],
            [
                "Recurring invoices to our clients weren't sent out on the 1st.",
                "invoice numbers jump from {invoice} to a much higher number",
                "Payment reminders to our customers go out twice.",
                "The 'mark as paid' button doesn't update the invoice status.",
            ],
            [
                "Our clients are confused.",
                "It started after the last update.",
            ],
        ),
        (
            ["Can't download invoice", "Invoice PDF error", "Billing page blank"],
            [
                "When I click 'Download PDF' on an invoice I get '{error}'.",
                "the billing page in settings is just a blank screen, I can't see my invoices",
                "The receipts page {url} returns '{error}' for every payment.",
            ],
            [
                "Our accountant needs these today.",
                "It worked last month.",
                "Tried {browser} as well.",
            ],
        ),
        (
            ["Reset link broken", "Invite page error", "Password page 404"],
            [
                "The password reset link in the email goes to a 404 page.",
                "clicking 'forgot password' shows '{error}'",
                "When I invite a colleague to the team the page throws '{error}'.",
            ],
            [
                "I tried several times.",
                "Same on {browser}.",
            ],
        ),
        (
            ["App crashes", "{product} keeps crashing", "Crash when opening {feature}"],
            [
                "{product} crashes every time I open {feature}.",
                "the app just closes when i tap on {feature}, started after the update to "
                "{version}",
                "Opening {feature} freezes the whole app and then it crashes.",
            ],
            [
                "Reinstalling didn't help.",
                "It happens on {browser}, haven't tried anything else.",
                "Here is what the console says:\n{stack}",
            ],
        ),
        (
            ["Export broken", "CSV export empty", "Export doesn't work"],
            [
                "CSV export gives an empty file since yesterday.",
                "when I export the report the numbers are all zero",
                "Exporting to Excel downloads a file that won't open.",
            ],
            [
                "It worked fine last week.",
                "Tried with a smaller date range, same thing.",
                "The file is 0 KB.",
            ],
        ),
        (
            ["Sync not working", "Data not syncing", "Changes don't sync"],
            [
                "{product} doesn't sync between my laptop and phone since version {version}.",
                "changes I make on the web don't show up in the mobile app",
                "Sync is stuck at 'pending' for hours.",
            ],
            [
                "I logged out and back in, no change.",
                "Other people on my team see the same.",
                "Log:\n{stack}",
            ],
        ),
        (
            ["Error message", "{error}", "Getting an error on {url}"],
            [
                "I keep getting '{error}' when I open {url}.",
                "Every time I save I get '{error}'.",
                "{feature} shows '{error}' and nothing loads",
            ],
            [
                "Screenshot attached.",
                "This is blocking our whole team.",
                "Started around {hour} today.",
            ],
        ),
        (
            ["Button does nothing", "Can't click save", "UI broken in {browser}"],
            [
                "The save button in {feature} does nothing in {browser}.",
                "half of the page is blank in {browser}, the menu is gone",
                "Dropdowns don't open anymore, I can't select anything.",
            ],
            [
                "Cleared cache and cookies already.",
                "Works in private mode though, weird.",
                "No error shown, it just doesn't react.",
            ],
        ),
        (
            ["Very slow", "Dashboard takes forever", "Timeouts"],
            [
                "{feature} takes over two minutes to load and then times out.",
                "everything is super slow today, is something down?",
                "Pages keep timing out when I filter by date.",
            ],
            [
                "Our internet is fine, other sites load quickly.",
                "It was fast until this week.",
                "We have about {n}k records if that matters.",
            ],
        ),
        (
            ["Wrong totals", "Numbers don't add up", "Tax calculated wrong"],
            [
                "The totals in {feature} don't match the sum of the lines.",
                "The invoice editor calculates the VAT wrong when there's a discount, so our "
                "invoices to customers are off by {amount}.",
                "the report shows {amount} but adding the rows up gives a different number",
            ],
            [
                "Looks like a rounding problem.",
                "We had to correct the invoices by hand.",
                "Happy to share the workbook.",
            ],
        ),
        (
            ["Checkout page broken", "Payment page error", "Can't pay, page spins"],
            [
                "The payment page spins forever when I click 'Pay', it never finishes.",
                "When I try to enter card details the form throws '{error}'.",
                "upgrade page is broken, clicking the plan button does nothing",
            ],
            [
                "I want to pay, your page won't let me.",
                "Tried {browser} too.",
                "Console:\n{stack}",
            ],
        ),
        (
            ["Login loop", "2FA page loops", "Can't get past login"],
            [
                "After I enter the 2FA code it sends me back to the login page, over and over.",
                "login page reloads after I press sign in, no error shown",
            ],
            [
                "My password is definitely right.",
                "Started after the update this morning.",
            ],
        ),
        (
            ["Notifications not sent", "No email alerts anymore"],
            [
                "Shipment notifications stopped being sent to our customers on {day}.",
                "we don't get the daily summary email anymore even though it's switched on",
            ],
            [
                "Nothing in spam.",
                "The setting is still enabled.",
            ],
        ),
    ],
    "feature request": [
        (
            ["Online payments for clients", "Payment links", "Invoice templates"],
            [
                "Could our clients pay invoices by card straight from the invoice email?",
                "Please add payment links on invoices, like Stripe has.",
                "we need more invoice templates, ours has to show the bank details at the top",
                "Would be great if refunds to our customers could be recorded in {product}.",
            ],
            [
                "That would get us paid faster.",
                "Our old tool could do this.",
            ],
        ),
        (
            ["Why can't I", "Missing option", "Really??"],
            [
                "Why is there no way to undo a deleted shipment? Every other tool has this.",
                "honestly it's ridiculous that I can't change the date format to DD/MM",
                "I can't believe there is still no way to duplicate an invoice.",
            ],
            [
                "Please add it.",
                "Hope this is on the roadmap.",
                "We've asked before.",
            ],
        ),
        (
            ["Admin controls", "Audit log", "Enforce 2FA"],
            [
                "Please let admins require two-factor login for everyone on the team.",
                "Could you add an audit log showing who logged in and what they changed?",
                "We'd like to restrict logins to our office IP addresses.",
            ],
            [
                "Our auditors keep asking for this.",
                "Happy to test it early.",
            ],
        ),
        (
            ["Dark mode?", "Feature idea", "Suggestion"],
            [
                "Would be great if you could add a dark mode.",
                "any chance of a dark theme? my eyes hurt after a long day",
                "Could you make the font size adjustable? It's really small on big screens.",
            ],
            [
                "Lots of people in our team asked for it.",
                "Other tools we use all have it.",
                "Not urgent, just an idea.",
            ],
        ),
        (
            ["Integration with {integration}", "{integration} integration?", "API access"],
            [
                "Are there any plans for an integration with {integration}?",
                "We'd love to connect {product} to {integration} so we don't copy data by hand.",
                "please add an API endpoint for {feature}, we want to automate this",
            ],
            [
                "We would pay extra for this.",
                "Right now we export and import every week.",
                "Zapier doesn't cover what we need.",
            ],
        ),
        (
            ["Export to PDF", "More export formats", "Scheduled reports"],
            [
                "It would help a lot if reports could be exported as PDF.",
                "Can you add scheduled reports that get emailed every Monday?",
                "please let us choose which columns go into the export",
            ],
            [
                "We send these to our managers every week.",
                "At the moment we take screenshots.",
                "Would save us hours.",
            ],
        ),
        (
            ["Bulk edit", "Bulk actions please", "Select multiple"],
            [
                "We need a way to edit many items at once, doing them one by one takes ages.",
                "Please add bulk delete, I have {n} old shipments to clean up.",
                "can you let us select multiple invoices and mark them paid in one go",
            ],
            [
                "Every other tool has this.",
                "It's the main thing slowing us down.",
                "Even a simple checkbox column would do.",
            ],
        ),
        (
            ["SSO support", "Okta login", "Single sign-on"],
            [
                "Do you plan to support single sign-on with Okta or Azure AD?",
                "Our IT wants SSO before we roll {product} out to the whole company.",
            ],
            [
                "It's a requirement from our security team.",
                "We have about {n} users who would join.",
            ],
        ),
        (
            ["Multiple currencies", "Pay annually option", "Invoice in EUR"],
            [
                "Please support multiple currencies on invoices, we bill customers in EUR and GBP.",
                "It would be nice to have an option to pay annually with a discount.",
                "Could invoices show prices both with and without tax?",
            ],
            [
                "Right now we have to fix it in Excel.",
                "We'd switch to yearly right away.",
                "Our competitors' tools already do this.",
            ],
        ),
        (
            ["Search is useless", "Filters please", "Improve search"],
            [
                "The search is really limited, please add filters by date and customer.",
                "search should find partial matches, right now I have to type the exact name",
                "It's frustrating that I can't sort the list by amount. Please add sorting.",
            ],
            [
                "Not a bug, I know it works as designed, but it's painful.",
                "This would make the product so much better.",
                "We have {n} records so scrolling is not an option.",
            ],
        ),
        (
            ["Offline mode", "Mobile app suggestion", "Widget request"],
            [
                "Would love an offline mode in the mobile app for when drivers lose signal.",
                "Could you add a home screen widget that shows today's deliveries?",
                "Please make it possible to attach photos to a shipment from the phone.",
            ],
            [
                "Our drivers work in rural areas.",
                "Just a suggestion from a happy customer.",
                "Let me know if you want feedback on a beta.",
            ],
        ),
    ],
    "account": [
        (
            ["Accountant access", "Add our bookkeeper", "Billing contact"],
            [
                "Our accountant needs access to the invoices, how do I add her as a user?",
                "How do I give our bookkeeper access to the billing section only?",
                "I want to make {name} the billing contact on our account.",
            ],
            [
                "She shouldn't be able to change anything else.",
                "We're on the {plan} plan.",
            ],
        ),
        (
            ["Password reset", "Reset email not arriving", "Can't reset password"],
            [
                "I requested a password reset three times but the email never arrives.",
                "forgot my password and the reset link says it has expired",
                "How do I reset my password? The link on the login page doesn't send anything.",
            ],
            [
                "Checked spam, nothing.",
                "My login is {email}.",
                "I need access today.",
            ],
        ),
        (
            ["Locked out", "Lost phone 2FA", "Account locked"],
            [
                "I lost my phone and can't get the 2FA code, please help me get back into my "
                "account.",
                "my account got locked after too many attempts",
                "Can you disable two-factor on my account? I got a new phone.",
            ],
            [
                "I can verify my identity with the last invoice number {invoice}.",
                "I'm the admin so nobody else can reset it.",
                "The backup codes were on the old phone.",
            ],
        ),
        (
            ["Change email", "Update login email", "New email address"],
            [
                "How can I change the email address I log in with? We changed our domain.",
                "please update my account email from the old one to {email}",
                "I want to change my username.",
            ],
            [
                "The old mailbox will be shut down next week.",
                "Keep everything else the same.",
                "I can't find it in settings.",
            ],
        ),
        (
            ["Add user", "Invite team member", "Remove user", "Transfer ownership"],
            [
                "How do I add a new colleague to our team workspace?",
                "Please remove {name} from our account, they left the company.",
                "Our account owner left, we need to transfer ownership to me.",
                "the invite email to my colleague never arrived, how else can I add them",
            ],
            [
                "I'm an admin on the {plan} plan.",
                "We still need their data.",
                "{name} is copied on this email to confirm.",
            ],
        ),
        (
            ["Delete my account", "GDPR deletion request", "Close account"],
            [
                "Please delete my account and all my personal data.",
                "Under GDPR I request deletion of all data you hold about me.",
                "how do I close my account completely?",
            ],
            [
                "Please confirm when it's done.",
                "I no longer use {product}.",
                "My account email is {email}.",
            ],
        ),
        (
            ["Permissions", "User roles", "Can't see projects"],
            [
                "How do I give a team member read-only access?",
                "My colleague can't see the shared folders even though I invited him as admin.",
                "I need to change {name}'s role from viewer to editor.",
            ],
            [
                "We want accountants to see invoices but not edit them.",
                "Not sure if it's a setting or what.",
                "I've looked in the team settings page.",
            ],
        ),
        (
            ["Merge accounts", "Two accounts", "Duplicate account"],
            [
                "I accidentally created two accounts, can you merge them?",
                "I have a personal account and a work account, can I move my data to the work one?",
            ],
            [
                "Both use the same name.",
                "Please keep the work one.",
            ],
        ),
        (
            ["Account suspended", "Why was my account deactivated"],
            [
                "My account says it's deactivated, I didn't do anything.",
                "we can't log in, the message says the workspace is suspended",
            ],
            [
                "All our data is in there.",
                "Please reactivate it asap.",
            ],
        ),
    ],
    "other": [
        (
            ["Support hours", "Status page?", "Phone number"],
            [
                "What are your support hours?",
                "Do you have a status page I can follow?",
                "Is there a phone number I can call instead of writing?",
            ],
            [
                "Thanks.",
                "We're in a different time zone.",
            ],
        ),
        (
            ["Partnership", "Reseller inquiry", "Collaboration"],
            [
                "We are an agency and would like to become a reseller of {product}. Who should I "
                "talk to?",
                "Hi, I'm reaching out about a possible partnership between {company} and your "
                "team.",
            ],
            [
                "We work with about {n} small businesses.",
                "Happy to set up a call next week.",
            ],
        ),
        (
            ["Thank you!", "Great support", "Just wanted to say"],
            [
                "Just wanted to say thanks to {name} from your team, they were super helpful last "
                "week.",
                "Love the new update, keep it up!",
                "you guys are great, {product} saved us so much time this year",
            ],
            [
                "No need to reply.",
                "Have a great weekend.",
            ],
        ),
        (
            ["Security questionnaire", "Data location", "Compliance question"],
            [
                "Where is our data stored? Our legal team asks whether it stays in the EU.",
                "Can you fill in our vendor security questionnaire? It's attached.",
                "Do you have a SOC 2 report we could look at?",
            ],
            [
                "We need this for our annual audit.",
                "A PDF would be fine.",
            ],
        ),
        (
            ["Press inquiry", "Interview request", "Webinar question"],
            [
                "I'm a journalist writing about small business software, could I interview "
                "someone?",
                "Is there a recording of last week's webinar?",
                "Are you going to be at the trade show in {month}?",
            ],
            [
                "Deadline is Friday.",
                "Thanks in advance.",
            ],
        ),
        (
            ["Any update?", "Following up", "Re: my ticket", "Hello?"],
            [
                "Any update on my previous ticket? Haven't heard back.",
                "hello? is anyone there",
                "Following up on my email from {day}.",
                "Just checking you got my message.",
            ],
            [
                "Thanks.",
                "It's been a few days.",
            ],
        ),
        (
            ["Out of office", "Automatic reply", "Wrong address"],
            [
                "I am out of the office until {day} with limited access to email. "
                "For urgent matters please contact {email}.",
                "Sorry, this was meant for our accounting firm, please ignore.",
                "Automatic reply: thank you for your message, we will get back to you shortly.",
            ],
            [
                "Regards.",
                "",
            ],
        ),
        (
            ["Boost your SEO", "Quick question", "Business proposal"],
            [
                "We can get your website to the first page of Google in 30 days. Reply for a free "
                "audit!",
                "Hi, we help SaaS companies cut their cloud costs by 40%. Interested in a quick "
                "chat?",
                "I'm a student doing research on customer support, could you answer a short "
                "survey?",
            ],
            [
                "Best regards, growth team",
                "Click here: {url}",
            ],
        ),
        (
            ["Question", "How does it work", "Hiring?"],
            [
                "Is {product} suitable for a team of five people?",
                "Do you have any open positions for developers?",
                "Which of your products would you recommend for a small bakery?",
            ],
            [
                "Just exploring options.",
                "My CV is attached.",
            ],
        ),
    ],
}

# Side remarks that drag in another class's vocabulary without changing the ticket's topic.
_ASIDES: dict[str, list[str]] = {
    "billing": [
        "(we're paying customers on the {plan} plan, for what it's worth)",
        "Also, is there a discount for annual billing?",
        "By the way, our last invoice still hasn't arrived.",
        "We pay {amount} a month for this so I expect it to work.",
    ],
    "bug": [
        "Also the app crashed twice while I was writing this.",
        "Side note: the page was really slow today as well.",
        "btw the export button seems broken too but that's not why I'm writing",
        "I got an error message when I first tried to send this.",
    ],
    "feature request": [
        "It would also be nice if you could add a dark mode some day.",
        "Also, an integration with {integration} would make our lives easier.",
        "Unrelated, but bulk editing would be a great feature.",
    ],
    "account": [
        "My colleague {name} is also an admin on the account.",
        "I'm writing from my personal email because I can't log in right now.",
        "(please reply to {email}, not the account email)",
        "I also need to reset my password at some point.",
    ],
    "other": [
        "Thanks for the great product by the way!",
        "Hope you're having a good week.",
        "Sorry for the long message.",
    ],
}

_GENERIC_SUBJECTS = [
    "Help",
    "question",
    "URGENT",
    "Re: your message",
    "(no subject)",
    "Issue with {product}",
    "{product}",
    "problem",
    "Support request",
    "Fwd: {product} account",
]
_GREETINGS = ["Hi,", "Hello,", "Hi team,", "Dear support,", "Hey,", "Good morning,", "Hi there,"]
_SIGNOFFS = [
    "Thanks,",
    "Best regards,",
    "Cheers,",
    "Thank you,",
    "Regards,",
    "Kind regards,",
    "Thx",
]
_CONTEXT = [
    "We've been using {product} for about two years at {company}.",
    "I'm the office manager at {company}.",
    "Not sure if this is the right place to ask.",
    "I tried the help center first but couldn't find anything.",
    "This is the second time I'm writing about this.",
    "Quick one:",
]
# Long, topic-neutral paragraphs: the writers who explain their whole situation first.
_BACKSTORY = [
    "To give you some background: we moved to {product} in {month} from spreadsheets, and "
    "overall the team is happy with it. We are {n} people, mostly in the office but a few "
    "work remotely, and most of us use it every day, some on the phone and some on laptops.",
    "I have been going back and forth with our IT person about this all week and we could "
    "not figure it out, so I am writing to you directly. Sorry if this has been answered "
    "somewhere already, I did look through the help center and the community forum.",
    "We are a small family business ({company}) and I handle most of the admin myself, "
    "so I am not very technical. My nephew set up {product} for us last year and it has "
    "mostly been fine until now.",
    "For context, this is for our busiest month of the year, so anything you can do quickly "
    "would be very much appreciated. I have also cc'd {name} who looks after this with me.",
]
_MONTHS = ["January", "February", "March", "September", "October", "November"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the 3rd", "the 14th"]


@dataclass
class Ticket:
    """One support ticket; category is the ground truth and never goes to the model."""

    ticket_id: str
    created_at: str
    customer: str
    product: str
    channel: str
    subject: str
    body: str
    category: str


TICKET_COLUMNS = ["ticket_id", "created_at", "customer", "product", "channel", "subject", "body"]


def _typos(rng: random.Random, text: str, count: int) -> str:
    # Swap two adjacent letters or drop one: the typos people actually make while typing fast.
    chars = list(text)
    for _ in range(count):
        i = rng.randrange(1, max(2, len(chars) - 2))
        if chars[i].isalpha() and chars[i + 1].isalpha():
            if rng.random() < 0.6:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            else:
                del chars[i]
    return "".join(chars)


class _Generator:
    def __init__(self, seed: int, start: date) -> None:
        self.rng = random.Random(seed)
        self.start = datetime.combine(start, time())
        self.categories = list(_CATEGORY_WEIGHTS)
        self.cum_categories = _cumulative(list(_CATEGORY_WEIGHTS.values()))
        self.cum_days = _cumulative(_DAY_WEIGHTS)
        self.cum_hours = _cumulative(_HOUR_WEIGHTS)
        self.cum_products = _cumulative(_PRODUCT_WEIGHTS)
        self.cum_channels = _cumulative(_CHANNEL_WEIGHTS)

    def slots(self, product: str, company: str, name: str) -> dict[str, str]:
        r = self.rng
        c = r.choice
        return {
            "product": product,
            "company": company,
            "name": name,
            "plan": c(_PLANS),
            "amount": f"${c((19, 29, 49, 79, 99, 149, 249, 480, 1188))}.00",
            "order": f"#{r.randrange(100000, 999999)}",
            "invoice": f"INV-{r.randrange(2024, 2027)}-{r.randrange(1, 9999):04d}",
            "n": str(r.randrange(3, 60)),
            "feature": c(_FEATURES),
            "integration": c(_INTEGRATIONS),
            "browser": c(_BROWSERS),
            "version": c(_VERSIONS),
            "error": c(_ERRORS),
            "url": f"https://app.{product.split()[0].lower()}.com/{c(_PATHS)}",
            "stack": c(_STACK),
            "email": f"{name.split()[0].lower()}@{company.split()[0].lower()}.com",
            "month": c(_MONTHS),
            "day": c(_DAYS),
            "hour": f"{r.randrange(7, 18)}:{c(('00', '15', '30', '45'))}",
        }

    def ticket(self, index: int) -> Ticket:
        r = self.rng
        pick = r.choices
        category = pick(self.categories, cum_weights=self.cum_categories)[0]
        product = pick(_PRODUCTS, cum_weights=self.cum_products)[0]
        channel = pick(_CHANNELS, cum_weights=self.cum_channels)[0]
        name = f"{r.choice(_FIRST)} {r.choice(_LAST)}"
        company = f"{r.choice(_COMPANY_A)} {r.choice(_COMPANY_B)}"
        slots = self.slots(product, company, name)

        subjects, cores, details = r.choice(_INTENTS[category])
        k = r.randrange(len(cores))
        # Subjects are listed in the same order as the core sentences they summarise; some
        # people write a vague subject (or none) instead.
        roll = r.random()
        if roll < 0.3:
            subject = r.choice(_GENERIC_SUBJECTS)
        elif roll < 0.8:
            subject = subjects[min(k, len(subjects) - 1)]
        else:
            subject = r.choice(subjects)
        parts = [cores[k]]
        # Length varies from the bare core sentence (a chat one-liner) to a long email.
        n_details = min(len(details), pick((0, 1, 2), weights=(4, 4, 2))[0])
        parts += r.sample(details, n_details)
        if r.random() < 0.45:
            other = pick(self.categories, cum_weights=self.cum_categories)[0]
            if other != category:
                parts.insert(r.randrange(0, len(parts) + 1), r.choice(_ASIDES[other]))
        if r.random() < 0.25 and channel != "chat":
            parts.insert(0, r.choice(_CONTEXT))
        if r.random() < 0.15:
            parts.append(f"Ref {slots['order']}")
        if channel in ("email", "web form") and r.random() < 0.12:
            parts.insert(r.randrange(0, len(parts) + 1), r.choice(_BACKSTORY))

        body = self.frame(channel, parts, name, company)
        body = body.format_map(slots)
        subject = subject.format_map(slots)

        roll = r.random()
        if roll < 0.3:
            body = _typos(r, body, r.randrange(1, 4))
        if channel == "chat" and r.random() < 0.5 or roll > 0.93:
            body = body.lower()
        elif roll > 0.88:
            body = body.upper()  # shouting
            subject = subject.upper()
        if r.random() < 0.12:
            body += r.choice(_EMOJI)

        day = pick(range(7), cum_weights=self.cum_days)[0]
        hour = pick(range(24), cum_weights=self.cum_hours)[0]
        created = self.start + timedelta(
            days=day, hours=hour, minutes=r.randrange(60), seconds=r.randrange(60)
        )
        return Ticket(
            ticket_id=f"T-{index + 1:06d}",
            created_at=created.isoformat(timespec="seconds"),
            customer=company if r.random() < 0.6 else name,
            product=product,
            channel=channel,
            subject=subject,
            body=body,
            category=category,
        )

    def frame(self, channel: str, parts: list[str], name: str, company: str) -> str:
        # Channels differ in form: email has greeting and signature, chat is terse, phone
        # tickets are an agent's transcript, web forms are whatever was typed in the box.
        r = self.rng
        if channel == "chat":
            return " ".join(parts[: r.randrange(1, 3)])
        if channel == "phone transcript":
            lines = ["Agent: Thanks for calling, how can I help?", f"Customer: {parts[0]}"]
            for part in parts[1:]:
                lines.append("Agent: I see, go on." if r.random() < 0.3 else "Agent: Okay.")
                lines.append(f"Customer: {part}")
            lines.append("Agent: Thanks, I'll log this for the team.")
            return "\n".join(lines)
        if channel == "web form":
            text = " ".join(parts)
            if r.random() < 0.4:
                # Some forms paste their fields into the ticket body.
                text = f"Name: {name}\nCompany: {company}\nTopic: Other\nMessage: {text}"
            return text
        greeting = r.choice(_GREETINGS) if r.random() < 0.8 else ""
        paragraphs = [" ".join(parts[:2])] + parts[2:]
        signature = "" if r.random() < 0.2 else f"{r.choice(_SIGNOFFS)}\n{name}"
        if signature and r.random() < 0.4:
            signature += f"\n{company}"
        return "\n\n".join(p for p in (greeting, *paragraphs, signature) if p)


def _cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return out


def generate_tickets(n: int, seed: int = 7, start: date = date(2026, 11, 16)) -> list[Ticket]:
    """n tickets created during the 7 days starting at start; same seed, same tickets."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen = _Generator(seed, start)
    return [gen.ticket(i) for i in range(n)]


def _write(path: Path | str, header: list[str], rows: Iterable[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_tickets_csv(tickets: Iterable[Ticket], path: Path | str) -> None:
    """The input the model sees: every column except the ground-truth category."""
    _write(path, TICKET_COLUMNS, ([getattr(t, c) for c in TICKET_COLUMNS] for t in tickets))


def write_truth_csv(tickets: Iterable[Ticket], path: Path | str) -> None:
    """ticket_id, category: the answers, kept apart so they cannot leak into the job."""
    _write(path, ["ticket_id", "category"], ([t.ticket_id, t.category] for t in tickets))


def write_labelled_csv(tickets: Iterable[Ticket], path: Path | str) -> None:
    """The labelled examples file: the ticket columns plus a label column."""
    _write(
        path,
        [*TICKET_COLUMNS, "label"],
        ([*(getattr(t, c) for c in TICKET_COLUMNS), t.category] for t in tickets),
    )
